"""Multiclass and multilabel tasks end to end: one lean `dvc repro` (prepare -> tune -> train ->
evaluate -> register) on synthetic data training both kinds at once, checkpoints chosen on a
multiclass metric and promotion decided on a multilabel one. Real DVC, Ray, DeepSpeed, MLflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from project_copy import commit_all, copy_project, local_env
from test_pipeline import predict_refusal, run, tiny_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PRIMARY = "val_macro_auroc_acuity"
REGISTRY_METRIC = "eval_val_micro_auprc_phenotype"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    work = tmp / "project"
    copy_project(work)
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tmp)
    (tmp / "no-raw-data").mkdir()  # synthetic data reads no raw files (an existing, empty dep)
    params["data"].update(raw_dir=str(tmp / "no-raw-data"), synthetic={"num_stays": 300, "seed": 2})
    params["train"].update(epochs=2, tasks=["acuity", "phenotype"], primary_metric=PRIMARY)
    params["tune"].update(num_samples=1, max_epochs=1, num_experts=[4], top_k=[2])
    params["registry"].update(model_name="fusemoe-kinds", metric=REGISTRY_METRIC)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = local_env(work, tmp)
    commit_all(work, env)
    run(["dvc", "repro", "register"], work, env)
    return work, env


def test_multiclass_and_multilabel_metrics_are_in_metrics_json_and_mlflow(project):
    import mlflow

    work, env = project
    metrics = json.loads((work / "metrics.json").read_text())
    for split in ("val", "test"):
        acuity = metrics["acuity"][split]
        assert 0.0 <= acuity["accuracy"] <= 1.0 and 0.0 <= acuity["macro_f1"] <= 1.0
        assert 0.0 <= acuity["macro_auroc"] <= 1.0
        pheno = metrics["phenotype"][split]
        for k in ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc"):
            assert 0.0 <= pheno[k] <= 1.0, k
    run_id = json.loads((work / "models/train/run.json").read_text())["mlflow_run_id"]
    logged = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics
    assert logged[REGISTRY_METRIC] == pytest.approx(metrics["phenotype"]["val"]["micro_auprc"])
    assert logged["eval_test_accuracy_acuity"] == pytest.approx(
        metrics["acuity"]["test"]["accuracy"]
    )
    assert {"accuracy_acuity", "macro_auroc_phenotype"} <= set(
        metrics["missingness_sweep"]["mcar"][0]
    )
    confusion = json.loads((work / "plots/confusion_acuity.json").read_text())
    assert sum(r["count"] for r in confusion) == metrics["acuity"]["test"]["n"]
    assert len(json.loads((work / "plots/labels_phenotype.json").read_text())) == 3
    for picture in ("confusion_acuity.png", "labels_phenotype.png"):
        assert (work / "plots" / picture).is_file(), picture


def test_checkpoint_is_chosen_on_the_multiclass_primary_metric(project):
    work, _ = project
    run_json = json.loads((work / "models/train/run.json").read_text())
    history = json.loads((work / "metrics/train_history.json").read_text())
    scores = [h[PRIMARY] for h in history]
    assert len(scores) == 2
    assert run_json["best_epoch"] == int(np.argmax(scores)) + 1
    assert run_json["best_metrics"][PRIMARY] == pytest.approx(max(scores))


def test_registry_compares_on_the_multilabel_metric(project):
    work, _ = project
    metrics = json.loads((work / "metrics.json").read_text())
    registry = json.loads((work / "models/registry.json").read_text())
    assert registry["champion"] is True
    assert registry["challenger_metric"] == pytest.approx(
        metrics["phenotype"]["val"]["micro_auprc"]
    )


def test_predictions_and_pyfunc_return_class_and_label_probabilities(project):
    import mlflow

    from pipelines.packaging import example_records

    work, env = project
    expected = pd.read_parquet(work / "metrics/test_predictions.parquet")
    acuity = [f"prob_acuity_{k}" for k in range(4)]
    phenotype = [f"prob_phenotype_{k}" for k in range(3)]
    assert set(acuity + phenotype + ["pred_acuity"]) <= set(expected.columns)
    np.testing.assert_allclose(expected[acuity].sum(1), 1.0, atol=1e-5)
    assert (expected["pred_acuity"] == expected[acuity].to_numpy().argmax(1)).all()
    assert ((expected[phenotype] >= 0) & (expected[phenotype] <= 1)).all().all()

    records = example_records(work / "data/processed", n_stays=len(expected))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    got = mlflow.pyfunc.load_model("models:/fusemoe-kinds@champion").predict(records)
    merged = expected.merge(got, on="stay_id", suffixes=("_evaluate", "_pyfunc"))
    assert len(merged) == len(expected)
    for col in acuity + phenotype:
        np.testing.assert_allclose(merged[f"{col}_pyfunc"], merged[f"{col}_evaluate"], atol=1e-5)
    assert (merged["pred_acuity_pyfunc"] == merged["pred_acuity_evaluate"]).all()


def test_predict_cli_rejects_what_prepare_rejects_and_writes_nothing(project, tmp_path):
    from pipelines.packaging import example_records

    work, env = project
    records = example_records(work / "data/processed", n_stays=3)
    static = records[records["modality"] == "static"]
    vitals = np.flatnonzero(records["modality"] == "vitals")
    cases = {
        "empty": (records.iloc[:0], "records: no rows (nothing to score)"),
        "unknown_static_variable": (
            records.assign(
                variable=records["variable"].where(records["modality"] != "static", "Height")
            ),
            "unknown variable 'Height' for modality 'static'",
        ),
        "repeated_static_value": (
            pd.concat([records, static.iloc[:1].assign(value=99.0)], ignore_index=True),
            "has static variable",
        ),
        "extreme_value": (
            records.assign(value=records["value"].where(~records.index.isin(vitals), 3e38)),
            "prediction",
        ),
    }
    for name, (bad, expected) in cases.items():
        last = predict_refusal(bad, tmp_path / name, work, env)
        src = tmp_path / f"{name}.parquet"
        assert last.startswith(f"error: {src}: records") and expected in last, (name, last)
    only_static, out = tmp_path / "static.parquet", tmp_path / "static-out.parquet"
    static.to_parquet(only_static)
    run([str(BIN / "fusemoe"), "predict", str(only_static), str(out)], work, env)
    scored = pd.read_parquet(out)
    assert (
        len(scored) == static["stay_id"].nunique() and np.isfinite(scored.iloc[:, 1:]).all().all()
    )
