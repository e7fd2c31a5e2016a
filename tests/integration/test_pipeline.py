"""`dvc repro` end to end in a temp copy of the repo: real DVC, Ray, DeepSpeed and MLflow (SQLite).

Small synthetic data and a tiny model keep it to a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def tiny_params(params: dict, tmp: Path) -> dict:
    # raw_dir stays a (real, read-only) DVC dependency even for the synthetic source.
    params["data"].update(source="synthetic", out_dir="data/processed",
                          raw_dir=str(REPO.parent / "shared/data/physionet2012"))
    params["data"]["synthetic"] = {"num_stays": 400, "seed": 1}
    params["model"].update(d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=4,
                           top_k=2, expert_hidden=32)
    params["train"].update(epochs=2, batch_size=32, tasks=["ihm"], primary_metric="val_auroc_ihm")
    params["ray"].update(num_workers=1, storage_path=str(tmp / "ray"))
    params["registry"].update(model_name="fusemoe-it", metric="eval_val_auroc_ihm", max_ece=1.0)
    params["mlflow"]["system_metrics"] = False
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    work = tmp / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    for stale in ("dvc.lock", "metrics.json"):
        (work / stale).unlink(missing_ok=True)
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tmp)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(work)}
    env.pop("RAY_ADDRESS", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "x"]):
        run(cmd, work, env)
    first = run(["dvc", "repro"], work, env)
    return work, env, first


def test_repro_registers_a_champion_with_metrics(project):
    work, env, _ = project
    metrics = json.loads((work / "metrics.json").read_text())
    assert 0.0 <= metrics["ihm"]["test"]["auroc"] <= 1.0
    registry = json.loads((work / "models/registry.json").read_text())
    assert registry["champion"] is True and registry["reason"] == "no champion yet"
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("fusemoe-it", "champion")
    assert champion.version == registry["version"]
    run_json = json.loads((work / "models/train/run.json").read_text())
    mlflow_run = client.get_run(run_json["mlflow_run_id"])
    assert mlflow_run.data.tags["git_sha"] != "unknown"
    assert "eval_test_auroc_ihm" in mlflow_run.data.metrics
    # per-epoch curves logged by the Ray worker (rank 0)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val_auroc_ihm")) == 2
    shown = run(["dvc", "metrics", "show"], work, env)
    assert "ihm.test.auroc" in shown


def test_second_repro_is_fully_cached(project):
    work, env, _ = project
    out = run(["dvc", "repro"], work, env)
    assert "Running stage" not in out, out


def test_changed_params_retrain_and_promotion_is_guarded(project):
    work, env, _ = project
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = 0.0001
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    registry = json.loads((work / "models/registry.json").read_text())
    assert registry["version"] == "2"
    beats = registry["challenger_metric"] > registry["champion_metric"] + 0.0
    assert registry["champion"] == beats
