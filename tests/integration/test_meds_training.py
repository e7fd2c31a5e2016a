"""End to end from MEDS: a tiny self-written MEDS dataset -> `python -m pipelines.prepare`
(data.source: meds) -> one epoch of the shipped loop (fusemoe.loop.train) -> held-out predictions
in the MEDS prediction schema. Binary and a 25-label phenotyping-like multilabel task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from training_runs import TINY_MODEL

from fusemoe.data.meds import PREDICTION_SCHEMA, write_synthetic_meds
from pipelines.packaging import example_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TRAIN_AND_PREDICT = """
import json, shutil, sys
from pathlib import Path
import mlflow
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from fusemoe.data.dataset import FlexiModalDataset, collate
from fusemoe.data.meds import meds_predictions
from fusemoe.inference import predict, predictions_table
from fusemoe.loop import train
from fusemoe.model_io import load_model
from pipelines.packaging import FuseMoEPyfunc

out, model = Path(sys.argv[1]), json.loads(sys.argv[2])
results = {}
for task in ("outcome", "pheno"):
    cfg = {"data_dir": str(out / task), "model": model,
           "train": {"tasks": [task], "epochs": 1, "batch_size": 32, "lr": 0.01,
                     "weight_decay": 0.0, "seed": 0},
           "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0}}
    saved = {}
    def keep(metrics, ckpt, saved=saved, task=task):
        saved.update(metrics=metrics, model=load_model(ckpt / "model"))
        shutil.rmtree(out / f"model_{task}", ignore_errors=True)
        shutil.copytree(ckpt / "model", out / f"model_{task}")
    train(cfg, keep, log=lambda *a: None)
    results[task] = {k: v for k, v in saved["metrics"].items() if k.startswith("val_")}
    if task == "outcome":
        net, spec = saved["model"]
        test = DataLoader(FlexiModalDataset(out / task, "test"), batch_size=64, collate_fn=collate)
        pred = predict(net, test, torch.device("cpu"))
        table = predictions_table(pred, spec)
        pq.write_table(meds_predictions(table["stay_id"], table["prob_outcome"],
                                        pred["labels"]["outcome"]), out / "predictions.parquet")
(out / "metrics.json").write_text(json.dumps(results))
artifacts = {"model_dir": str(out / "model_outcome"), "manifest": str(out / "outcome/manifest.json")}
mlflow.pyfunc.save_model(str(out / "pyfunc"), python_model=FuseMoEPyfunc(), artifacts=artifacts)
"""


def prepare(work: Path, name: str, **meds) -> dict:
    params = work / f"{name}.yaml"
    data = {"source": "meds", "out_dir": str(work / name), "meds": meds}
    params.write_text(yaml.safe_dump({"data": data}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--params", str(params)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("prepare: meds:")
    return json.loads((work / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("meds")
    for name, n_labels in (("outcome", 1), ("pheno", 25)):
        write_synthetic_meds(work / f"meds_{name}", work / f"labels_{name}.parquet",
                             num_subjects=160, events_per_subject=30, num_labels=n_labels)  # fmt: skip
    prepare(work, "outcome", dataset_dir=str(work / "meds_outcome"),
            labels=str(work / "labels_outcome.parquet"))  # fmt: skip
    manifest = prepare(work, "pheno", dataset_dir=str(work / "meds_pheno"),
                       labels=str(work / "labels_pheno.parquet"), task="pheno",
                       task_kind="multilabel")  # fmt: skip
    assert manifest["tasks"][0]["num_outputs"] == 25
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    model = json.dumps(TINY_MODEL | {"dropout": 0.0})
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_PREDICT, str(work), model],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, json.loads((work / "metrics.json").read_text())


def test_a_meds_binary_task_trains_one_epoch_with_finite_validation_metrics(trained):
    _, metrics = trained
    assert 0.0 <= metrics["outcome"]["val_auroc_outcome"] <= 1.0


def test_a_25_label_meds_task_trains_through_the_multilabel_kind(trained):
    _, metrics = trained
    assert math.isfinite(metrics["pheno"]["val_macro_auroc_pheno"])


def test_held_out_predictions_are_written_in_the_meds_prediction_schema(trained):
    work, _ = trained
    table = pq.read_table(work / "predictions.parquet")
    assert table.schema == PREDICTION_SCHEMA
    held_out = pq.read_table(work / "outcome" / "stays.parquet").to_pandas()
    assert table.num_rows == int((held_out["split"] == "test").sum())
    assert table.column("boolean_value").null_count == 0
    assert table.column("predicted_boolean_probability").null_count == 0


def test_predict_cli_writes_meds_predictions_of_a_binary_task(trained):
    work, _ = trained
    records = example_records(work / "outcome", n_stays=4)
    records.to_parquet(work / "records.parquet")
    params = work / "cli.yaml"
    params.write_text(yaml.safe_dump({"data": {}, "registry": {},
                                      "mlflow": {"tracking_uri": f"sqlite:///{work}/m.db"}}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def predict(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "fusemoe"), "--params", str(params), "predict", str(work / "records.parquet"),
             str(work / "meds_out.parquet"), "--model", str(work / "pyfunc"), *extra],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    bad = predict("--meds", "mortality")
    assert bad.returncode != 0 and not (work / "meds_out.parquet").exists()
    assert bad.stderr.strip().endswith("--meds mortality: the model gives no binary probability "
                                       "prob_mortality (its outputs: prob_outcome)")  # fmt: skip
    proc = predict("--meds", "outcome")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pq.read_table(work / "meds_out.parquet")
    assert table.schema == PREDICTION_SCHEMA and table.num_rows == 4
    assert table.column("boolean_value").null_count == 4  # records carry no labels
    ids = sorted(records["stay_id"].unique())
    got = sorted(f"{r['subject_id']}@{r['prediction_time'].isoformat()}" for r in table.to_pylist())
    assert got == ids


def test_meds_source_by_params_only_and_its_files_are_dvc_inputs(tmp_path):
    from test_data_stages import NO_MIRROR, UP_TO_DATE, closed_port_url, dvc, make_project

    meds, labels = tmp_path / "meds", tmp_path / "labels.parquet"
    write_synthetic_meds(meds, labels, num_subjects=60, events_per_subject=20)
    work, env = make_project(
        tmp_path / "p",
        source="meds",
        meds={"dataset_dir": str(meds), "labels": str(labels)},
        **NO_MIRROR,
        physionet_url=closed_port_url(),
    )
    dvc(work, env, "repro", "prepare")
    manifest = json.loads((work / "data/processed/manifest.json").read_text())
    assert manifest["source"] == f"meds:{meds}" and manifest["counts"]["stays"] == 75
    assert UP_TO_DATE in dvc(work, env, "status", "prepare").stdout
    write_synthetic_meds(meds, labels, num_subjects=60, events_per_subject=20, seed=1)
    status = dvc(work, env, "status", "prepare").stdout
    assert f"modified:           {meds}" in status and f"modified:           {labels}" in status
