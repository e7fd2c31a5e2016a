"""Champion/challenger promotion against a real MLflow registry (SQLite in a temp dir).

The first tests use crafted runs (metrics and tags only) and are fast. The `slow` ones package real
FuseMoE models: one trained for a few epochs (known good) and a copy whose heads are zeroed, so it
predicts a constant (known bad: AUROC exactly 0.5, MAE the mean length of stay).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipelines.common import data_hash
from pipelines.register import champion, decide, promote, register_run

NAME = "fusemoe-test"
METRIC = "eval_val_auroc_ihm"
CFG = {"min_improvement": 0.01, "max_ece": 0.2}
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module (creating its tables takes seconds); tests use their own
    registered model names, or `client`'s fresh NAME."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("registry-test")
        yield uri


@pytest.fixture()
def client(store):
    """A client whose registered model NAME has no versions yet."""
    c = mlflow.MlflowClient()
    if c.search_registered_models(f"name = '{NAME}'"):
        c.delete_registered_model(NAME)
    c.create_registered_model(NAME)
    return c


def new_version(
    client, value: float | None, ece: float = 0.05, metric: str = METRIC, data: str = "d0"
) -> str:
    """A crafted run (metric `metric` = `value`, trained on data `data`) as a new version."""
    with mlflow.start_run() as run:
        mlflow.set_tag("data_hash", data)
        if value is not None:
            mlflow.log_metric(metric, value)
        mlflow.log_metric("eval_val_ece_ihm", ece)
        mlflow.log_text("weights", "model/placeholder.txt")
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(NAME, source, run_id=run.info.run_id).version)


def aliases(client, name: str = NAME) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_first_model_becomes_champion(client):
    v1 = new_version(client, 0.80)
    assert promote(client, NAME, v1, METRIC, CFG).promote
    assert str(champion(client, NAME).version) == v1


def test_worse_model_never_becomes_champion(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.79)
    decision = promote(client, NAME, v2, METRIC, CFG)
    assert not decision.promote
    assert str(champion(client, NAME).version) == v1
    assert client.get_model_version(NAME, v2).tags["promotion_decision"] == "challenger"


def test_improvement_below_margin_is_not_enough(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.805)
    assert not promote(client, NAME, v2, METRIC, CFG).promote
    assert str(champion(client, NAME).version) == v1


def test_better_model_takes_champion_and_keeps_previous_for_rollback(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.85)
    assert promote(client, NAME, v2, METRIC, CFG).promote
    assert str(champion(client, NAME).version) == v2
    assert str(client.get_model_version_by_alias(NAME, "previous_champion").version) == v1


def test_nan_metric_never_promoted_even_without_champion(client):
    v1 = new_version(client, math.nan)
    assert not promote(client, NAME, v1, METRIC, CFG).promote
    assert champion(client, NAME) is None


def test_badly_calibrated_model_fails_the_sanity_gate(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.95, ece=0.4)
    decision = promote(client, NAME, v2, METRIC, CFG)
    assert not decision.promote and "calibration" in decision.reason
    assert str(champion(client, NAME).version) == v1


def test_force_promotes_and_says_so(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.70)
    decision = promote(client, NAME, v2, METRIC, CFG, force=True)
    assert decision.promote and decision.reason.startswith("forced")
    assert str(champion(client, NAME).version) == v2


def test_decide_requires_strict_improvement_over_margin():
    assert not decide(METRIC, 0.81, 0.05, 0.80, 0.01, 0.2).promote
    assert decide(METRIC, 0.8101, 0.05, 0.80, 0.01, 0.2).promote


def test_decision_prints_a_close_challenger_and_champion_with_enough_digits_to_differ():
    reason = decide(METRIC, 0.888392, 0.05, 0.888361, 0.0, 0.2).reason
    assert "0.88839 beats champion 0.88836" in reason, reason
    assert "0.8000 does not beat champion 0.8000" in decide(METRIC, 0.8, 0.05, 0.8, 0.0, 0.2).reason


def test_champion_whose_run_lacks_the_registry_metric_is_not_replaced(client):
    # The champion was chosen under another registry.metric; its run has no AUPRC to compare.
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.60, metric="eval_val_auprc_ihm")
    decision = promote(client, NAME, v2, "eval_val_auprc_ihm", CFG)
    assert not decision.promote
    assert "has no eval_val_auprc_ihm metric" in decision.reason, decision.reason
    assert aliases(client) == {"champion": v1}


def test_lower_is_better_metric_promotes_only_a_lower_error(client):
    mae = "eval_val_mae_los_days"
    v1 = new_version(client, 2.0, metric=mae)
    promote(client, NAME, v1, mae, CFG)
    v2 = new_version(client, 2.5, metric=mae)  # a larger error: worse
    assert not promote(client, NAME, v2, mae, CFG).promote
    assert str(champion(client, NAME).version) == v1
    v3 = new_version(client, 1.5, metric=mae)
    decision = promote(client, NAME, v3, mae, CFG)
    assert decision.promote and "lower is better" in decision.reason
    assert aliases(client) == {"champion": v3, "previous_champion": v1}


def test_champion_on_other_data_that_cannot_be_rescored_is_kept_and_says_why(client):
    v1 = new_version(client, 0.80, data="aaaa")
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.90, data="bbbb")  # a higher number, but on other data
    decision = promote(client, NAME, v2, METRIC, CFG)
    assert not decision.promote
    assert "trained on data aaaa, the challenger on bbbb" in decision.reason, decision.reason
    assert str(champion(client, NAME).version) == v1


# ---- the `fusemoe` console script -------------------------------------------------------------


def fusemoe(params: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [str(BIN / "fusemoe"), "--params", str(params), *args],
        cwd=params.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_promote_and_rollback_commands_move_the_aliases_and_exit_accordingly(client, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"out_dir": str(tmp_path / "no-data")},
                "mlflow": {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"]},
                "registry": {"model_name": NAME, "metric": METRIC, **CFG},
            }
        )
    )
    v1, v2, v3 = new_version(client, 0.80), new_version(client, 0.85), new_version(client, 0.70)
    promote(client, NAME, v1, METRIC, CFG)

    worse = fusemoe(params, "promote", v3)
    assert worse.returncode == 1 and "unchanged" in worse.stdout, worse.stderr[-2000:]
    assert aliases(client) == {"champion": v1}

    better = fusemoe(params, "promote", v2)
    assert better.returncode == 0, better.stderr[-2000:]
    assert aliases(client) == {"champion": v2, "previous_champion": v1}

    back = fusemoe(params, "rollback")
    assert back.returncode == 0 and f"champion {v2} -> {v1}" in back.stdout, back.stderr[-2000:]
    assert aliases(client) == {"champion": v1, "previous_champion": v2}

    missing = fusemoe(params, "promote", "99")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"error: registered model {NAME} has no version 99"
    )
    assert aliases(client) == {"champion": v1, "previous_champion": v2}


@pytest.mark.slow
def test_rollback_without_a_champion_is_one_clear_error(client, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"out_dir": "data/processed"},
                "mlflow": {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"]},
                "registry": {"model_name": NAME, "metric": METRIC, **CFG},
            }
        )
    )
    proc = fusemoe(params, "rollback")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {NAME} has no champion to roll back"


# ---- real packaged models ---------------------------------------------------------------------

TRAIN_TWO_MODELS = """
import json, shutil, sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from fusemoe.data.dataset import FlexiModalDataset, collate
from fusemoe.data.synthetic import write_synthetic
from fusemoe.inference import predict
from fusemoe.loop import train
from fusemoe.metrics import task_metrics
from fusemoe.model_io import load_model, save_model

out = Path(sys.argv[1])
write_synthetic(out / "data_a", num_stays=300, seed=1)
write_synthetic(out / "data_b", num_stays=300, seed=2)
model = dict(d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=2, top_k=1,
             expert_hidden=16, gate="softmax", router="joint", dropout=0.0, entropy_weight=0.0)
tasks = ["los_gt7", "los_days"]
cfg = {"data_dir": str(out / "data_a"), "model": model,
       "train": {"tasks": tasks, "epochs": 3, "batch_size": 32, "lr": 0.01, "weight_decay": 0.0,
                 "seed": 0},
       "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0}}

def keep(metrics, ckpt):
    shutil.rmtree(out / "good", ignore_errors=True)
    shutil.copytree(ckpt / "model", out / "good")

train(cfg, keep, log=lambda *a: None)
net, spec = load_model(out / "good")
state = {k: torch.zeros_like(v) if k.startswith("heads.") else v
         for k, v in net.state_dict().items()}
save_model(state, model, spec, out / "constant")
val = DataLoader(FlexiModalDataset(out / "data_a", "val"), batch_size=256, collate_fn=collate)
scores = {}
for name in ("good", "constant"):
    m = task_metrics(predict(load_model(out / name)[0], val, torch.device("cpu")), spec, "val")
    scores[name] = {f"eval_{k}": v for k, v in m.items()}
(out / "val_metrics.json").write_text(json.dumps(scores))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """data_a/, data_b/ (synthetic, other seeds), good/ (trained on data_a), constant/ and
    val_metrics.json (both scored on data_a's validation split, as evaluate logs them)."""
    out = tmp_path_factory.mktemp("models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_TWO_MODELS, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    scores = json.loads((out / "val_metrics.json").read_text())
    assert scores["constant"]["eval_val_auroc_los_gt7"] == 0.5  # the known bad model
    assert scores["good"]["eval_val_auroc_los_gt7"] > 0.6
    assert scores["good"]["eval_val_mae_los_days"] < scores["constant"]["eval_val_mae_los_days"]
    return out


def training_run(data_dir: Path, metrics: dict[str, float]) -> str:
    """An MLflow run as the train and evaluate stages leave it: data hash tag and eval metrics."""
    with mlflow.start_run() as run:
        mlflow.set_tag("data_hash", data_hash(data_dir))
        mlflow.log_metrics(metrics)
    return run.info.run_id


@pytest.mark.slow
def test_aliases_follow_the_known_better_model_on_a_lower_is_better_metric(models, store):
    client = mlflow.MlflowClient()
    cfg = {"model_name": "fusemoe-mae", "metric": "eval_val_mae_los_days", "max_ece": 1.0}
    scores = json.loads((models / "val_metrics.json").read_text())
    data = models / "data_a"

    def register(model: str) -> dict:
        run_id = training_run(data, scores[model])
        return register_run(client, run_id, data, cfg, models / model)

    bad = register("constant")["version"]
    assert aliases(client, "fusemoe-mae") == {"champion": bad, "challenger": bad}
    good = register("good")["version"]
    assert aliases(client, "fusemoe-mae") == {
        "champion": good,
        "challenger": good,
        "previous_champion": bad,
    }
    bad_again = register("constant")
    assert not bad_again["champion"]
    assert aliases(client, "fusemoe-mae") == {
        "champion": good,
        "challenger": bad_again["version"],
        "previous_champion": bad,
    }


@pytest.mark.slow
def test_champion_trained_on_other_data_is_rescored_on_the_challengers_validation_split(
    models, store
):
    """The champion's run reports AUROC 0.99 on its own (other) data; it predicts a constant, so
    on the challenger's validation split it scores exactly 0.5 and the real model wins."""
    client = mlflow.MlflowClient()
    metric = "eval_val_auroc_los_gt7"
    cfg = {"model_name": "fusemoe-other", "metric": metric, "max_ece": 1.0}
    scores = json.loads((models / "val_metrics.json").read_text())
    other = training_run(models / "data_b", {metric: 0.99})
    first = register_run(client, other, models / "data_b", cfg, models / "constant")
    challenger_run = training_run(models / "data_a", scores["good"])
    record = register_run(client, challenger_run, models / "data_a", cfg, models / "good")
    assert record["champion"], record["reason"]
    assert record["champion_metric"] == 0.5 and record["champion_metric_source"] == "re-scored"
    assert "re-scored on the challenger's validation split" in record["reason"]
    assert aliases(client, "fusemoe-other") == {
        "champion": record["version"],
        "challenger": record["version"],
        "previous_champion": first["version"],
    }


@pytest.mark.slow
def test_register_stage_run_twice_or_under_another_uri_keeps_one_version(models, store, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(models / "good", project / "models/train")
    scores = json.loads((models / "val_metrics.json").read_text())
    run_id = training_run(models / "data_a", scores["good"])
    (project / "models/train/run.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    params = {
        "data": {"out_dir": str(models / "data_a")},
        "mlflow": {"tracking_uri": store},
        "registry": {
            "model_name": "fusemoe-once",
            "metric": "eval_val_auroc_los_gt7",
            "max_ece": 1,
        },
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI")
    same_store = store.replace("/mlflow.db", "/./mlflow.db")
    records = []
    for extra in ({}, {"MLFLOW_TRACKING_URI": same_store}):  # a re-run, under another URI
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.register"],
            cwd=project,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        records.append(json.loads((project / "models/registry.json").read_text()))
    versions = mlflow.MlflowClient().search_model_versions("name = 'fusemoe-once'")
    assert [str(v.version) for v in versions] == ["1"]
    assert [r["version"] for r in records] == ["1", "1"]
    assert [r["already_registered"] for r in records] == [False, True]
    assert records[1]["champion"] and records[1]["tracking_uri"] == same_store


CLEAN_PREDICT = """
import sys
sys.path.append(sys.argv[1])  # site-packages only: no .pth files, so no editable install
for project_module in ("fusemoe", "pipelines"):
    try:
        __import__(project_module)
    except ImportError:
        pass
    else:
        sys.exit(f"{project_module} is importable from {sys.modules[project_module].__file__}")
import mlflow
import pandas as pd
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[3])
model.predict(pd.read_parquet("records.parquet")).to_parquet("predictions.parquet")
"""


@pytest.mark.slow
def test_packaged_model_predicts_where_the_project_is_not_installed(models, store, tmp_path):
    from mlflow.artifacts import download_artifacts

    from pipelines.packaging import example_records, log_pyfunc_model

    run_id = training_run(models / "data_a", {})
    uri = log_pyfunc_model(run_id, models / "data_a", models / "good")
    requirements = (Path(download_artifacts(uri)) / "requirements.txt").read_text().split()
    for pin in ("torch==2.13.0", "numpy==", "pandas==", "pyarrow==", "scikit-learn==", "mlflow=="):
        assert any(r.startswith(pin) for r in requirements), (pin, requirements)
    records = example_records(models / "data_a", n_stays=5)
    expected = mlflow.pyfunc.load_model(uri).predict(records)
    clean = tmp_path / "clean"
    clean.mkdir()
    records.to_parquet(clean / "records.parquet")
    proc = subprocess.run(
        # -I: no PYTHONPATH, no user site, no cwd on sys.path; -S: no site-packages .pth files.
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            CLEAN_PREDICT,
            sysconfig.get_paths()["purelib"],
            store,
            uri,
        ],  # fmt: skip
        cwd=clean,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_parquet(clean / "predictions.parquet")
    pd.testing.assert_frame_equal(got, expected)
