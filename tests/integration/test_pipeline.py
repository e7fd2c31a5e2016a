"""`dvc repro` end to end in a temp copy of the repo: real DVC, Ray, DeepSpeed and MLflow (SQLite).

Small synthetic data and a tiny model keep it to a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project_copy import commit_all, copy_project, local_env
from training_runs import TINY_MODEL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def predict_refusal(records, stem: Path, work: Path, env: dict) -> str:
    """Runs `fusemoe predict` on bad ``records``; asserts it fails without a traceback and writes
    nothing, and returns its last stderr line (the one-line error)."""
    src, dst = stem.with_suffix(".parquet"), stem.with_name(stem.name + "-out.parquet")
    records.to_parquet(src)
    proc = subprocess.run(
        [str(BIN / "fusemoe"), "predict", str(src), str(dst)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, (src, proc.stdout[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not dst.exists(), dst
    return proc.stderr.strip().splitlines()[-1]


def tiny_params(params: dict, tmp: Path) -> dict:
    # The synthetic source needs no PhysioNet files: no mirror, and no network either.
    params["data"].update(
        source="synthetic",
        out_dir="data/processed",
        raw_dir="",
        physionet_url="http://127.0.0.1:9/",
    )
    params["data"]["synthetic"] = {"num_stays": 400, "seed": 1}
    params["model"].update(TINY_MODEL)
    params["train"].update(
        epochs=2, batch_size=32, tasks=["ihm", "los_days"], primary_metric="val_auroc_ihm"
    )
    params["ray"].update(storage_path=str(tmp / "ray"))  # the default 2 workers x 1 CPU
    # A two-trial search whose best values the train stage then uses (train.use_best_params).
    params["tune"].update(
        num_samples=2,
        max_epochs=1,
        grace_period=1,
        max_train_stays=0,
        num_experts=[2, 4],
        top_k=[1, 2],
        gate=["softmax", "laplace"],
    )
    params["registry"].update(model_name="fusemoe-it", metric="eval_val_auroc_ihm", max_ece=1.0)
    params["mlflow"]["system_metrics"] = False
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    work = tmp / "project"
    copy_project(work)
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tmp)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = local_env(work, tmp)
    commit_all(work, env)
    # prepare -> tune -> train -> evaluate -> register
    first = run(["dvc", "repro", "register"], work, env)
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
    assert str(champion.version) == registry["version"]
    run_json = json.loads((work / "models/train/run.json").read_text())
    mlflow_run = client.get_run(run_json["mlflow_run_id"])
    assert mlflow_run.data.tags["git_sha"] != "unknown"
    assert "eval_test_auroc_ihm" in mlflow_run.data.metrics
    # per-epoch curves logged by the Ray worker (rank 0)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val_auroc_ihm")) == 2
    shown = run(["dvc", "metrics", "show"], work, env)
    assert "ihm.test.auroc" in shown
    assert (
        metrics["los_days"]["test"]["mae"] > 0
        and "eval_test_mae_los_days" in mlflow_run.data.metrics
    )
    for mechanism in ("mcar", "mnar"):
        sweep = metrics["missingness_sweep"][mechanism]
        assert [r["dropped_fraction"] for r in sweep] == [0.0, 0.2, 0.4, 0.6, 0.8]
        assert sweep[0]["auroc_ihm"] == pytest.approx(metrics["ihm"]["test"]["auroc"])
    logged = {f.path for f in client.list_artifacts(mlflow_run.info.run_id, "evaluation/plots")}
    for picture in (
        "roc_ihm",
        "pr_ihm",
        "calibration_ihm",
        "missingness_sweep",
        "training_curves",
        "router_entropy",
        "expert_usage",
    ):
        assert f"evaluation/plots/{picture}.png" in logged, picture
    html = run(["dvc", "plots", "show", "-o", "dvc_plots"], work, env)
    assert (work / "dvc_plots/index.html").is_file(), html


def test_train_uses_the_best_params_of_the_tune_stage(project):
    work, env, first = project
    assert "Running stage 'tune'" in first
    assert first.index("Running stage 'tune'") < first.index("Running stage 'train'")
    best = yaml.safe_load((work / "best_params.yaml").read_text())
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_json = json.loads((work / "models/train/run.json").read_text())
    logged = client.get_run(run_json["mlflow_run_id"]).data
    assert logged.tags["params_source"] == "params.yaml + best_params.yaml"
    for section, values in best.items():
        for key, value in values.items():
            assert logged.params[f"{section}.{key}"] == str(value), (section, key)
    config = json.loads((work / "models/train/model_config.json").read_text())
    assert config["model"]["num_experts"] == best["model"]["num_experts"]
    assert config["model"]["top_k"] == best["model"]["top_k"]


def test_each_epoch_progress_line_is_printed_once(project):
    _, _, first = project
    # train.epochs is 2 (tune trials run 1 epoch): the train stage's last epoch line, once.
    assert first.count("epoch 2/2 loss") == 1, first[-6000:]


def test_second_repro_is_fully_cached(project):
    work, env, _ = project
    out = run(["dvc", "repro", "register"], work, env)
    assert "Running stage" not in out, out


def test_changed_params_retrain_and_promotion_is_guarded(project):
    work, env, _ = project
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["weight_decay"] = 0.01  # (lr would be overridden by best_params.yaml)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "register"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    assert json.loads((work / "models/registry.json").read_text())["version"] == "2"
    # The aliases in MLflow, against the two runs' own validation AUROC (min_improvement 0); the
    # known better / worse models are in tests/integration/test_registry.py.
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    v1, v2 = (client.get_model_version("fusemoe-it", v) for v in ("1", "2"))
    auroc = [client.get_run(v.run_id).data.metrics["eval_val_auroc_ihm"] for v in (v1, v2)]
    aliases = {a: str(v) for a, v in client.get_registered_model("fusemoe-it").aliases.items()}
    if auroc[1] > auroc[0]:
        assert aliases == {"champion": "2", "challenger": "2", "previous_champion": "1"}
    else:
        assert aliases == {"champion": "1", "challenger": "2"}


def test_registered_pyfunc_reproduces_the_evaluate_stage_predictions(project):
    import mlflow
    import numpy as np
    import pandas as pd

    from pipelines.packaging import example_records

    work, env, _ = project
    expected = pd.read_parquet(work / "metrics/test_predictions.parquet")
    records = example_records(work / "data/processed", n_stays=len(expected))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    # The version the last evaluate stage scored (the champion may be an older, different model).
    version = json.loads((work / "models/registry.json").read_text())["version"]
    got = mlflow.pyfunc.load_model(f"models:/fusemoe-it/{version}").predict(records)
    merged = expected.merge(got, on="stay_id", suffixes=("_evaluate", "_pyfunc"))
    assert len(merged) == len(expected)
    np.testing.assert_allclose(merged["prob_ihm_pyfunc"], merged["prob_ihm_evaluate"], atol=1e-5)
    np.testing.assert_allclose(
        merged["los_days_pyfunc"], merged["los_days_evaluate"], rtol=1e-5, atol=1e-4
    )


def test_predict_cli_rejects_bad_records_and_writes_nothing(project, tmp_path):
    import pandas as pd

    from pipelines.packaging import example_records

    work, env, _ = project
    records = example_records(work / "data/processed", n_stays=3)
    cases = {
        "missing_column": records.drop(columns=["time_h"]),
        "unknown_modality": records.assign(modality="imaging"),
        "non_numeric_value": records.astype({"value": object}).assign(value="high"),
    }
    for name, bad in cases.items():
        last = predict_refusal(bad, tmp_path / name, work, env)
        assert last.startswith("error:") and str(tmp_path / f"{name}.parquet") in last, (name, last)
    good_src, good_dst = tmp_path / "good.parquet", tmp_path / "good-out.parquet"
    records.to_parquet(good_src)
    run([str(BIN / "fusemoe"), "predict", str(good_src), str(good_dst)], work, env)
    assert len(pd.read_parquet(good_dst)) == 3


def test_served_champion_answers_one_request_on_localhost(project):
    import socket
    import time
    import urllib.request

    from pipelines.packaging import example_records

    work, env, _ = project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/fusemoe-it@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.time() < deadline, "server did not come up in 180 s"
                time.sleep(2)
        records = example_records(work / "data/processed", n_stays=2)
        body = json.dumps({"dataframe_split": records.to_dict(orient="split")}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = json.loads(resp.read())["predictions"]
        assert len(preds) == 2 and all(0.0 <= p["prob_ihm"] <= 1.0 for p in preds)
    finally:
        server.terminate()
        server.wait(timeout=30)
