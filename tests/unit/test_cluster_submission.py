"""The cluster path without a cluster: Ray Job submission arguments and the KubeRay manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_jobs.submit import EXCLUDES, entrypoint, submission

REPO = Path(__file__).resolve().parents[2]


def test_a_stage_name_runs_its_pipelines_module_with_the_params_file():
    assert entrypoint(["train"]) == "python -m pipelines.train --params params.yaml"
    assert (
        entrypoint(["tune"], "p/cluster.yaml") == "python -m pipelines.tune --params p/cluster.yaml"
    )


def test_any_other_command_runs_verbatim_and_quoted():
    assert entrypoint(["dvc", "repro", "train"]) == "dvc repro train"
    assert entrypoint(["echo", "a b"]) == "echo 'a b'"


def test_an_empty_command_is_refused():
    with pytest.raises(ValueError, match="nothing to run"):
        entrypoint([])


def test_submission_never_puts_credentials_in_the_job_metadata():
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "pipeline",
        "MLFLOW_TRACKING_PASSWORD": "s3cret-pw",
        "MLFLOW_TRACKING_TOKEN": "s3cret-token",
        "AWS_ACCESS_KEY_ID": "AKIA-s3cret",
        "AWS_SECRET_ACCESS_KEY": "s3cret-key",
        "AWS_SESSION_TOKEN": "s3cret-session",
    }
    kwargs = submission(["train"], env=env)
    assert "s3cret" not in repr(kwargs)
    assert kwargs["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_submitting_with_a_local_sqlite_tracking_uri_is_refused_in_one_line(monkeypatch, capsys):
    from ray_jobs.submit import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(SystemExit) as exit_info:
        main(["--address", "http://127.0.0.1:1", "--", "train"])
    message = str(exit_info.value)
    assert message.startswith("error: MLflow tracking URI sqlite:///mlflow.db is a local file")
    assert "\n" not in message and "MLFLOW_TRACKING_URI" in message


def test_submission_uploads_the_project_without_local_state_and_passes_mlflow_through():
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "HOME": "/root",
        "MLFLOW_TRACKING_TOKEN": "",
    }
    kwargs = submission(["train"], env=env, submission_id="fusemoe-1")
    runtime_env = kwargs["runtime_env"]
    assert kwargs["entrypoint"] == "python -m pipelines.train --params params.yaml"
    assert kwargs["submission_id"] == "fusemoe-1"
    assert runtime_env["working_dir"] == "."
    assert {".venv", "data", "runs", "mlruns", ".git"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "HOME" not in runtime_env["env_vars"]  # only the MLflow/storage variables travel
    assert "MLFLOW_TRACKING_TOKEN" not in runtime_env["env_vars"]  # empty = unset
    assert kwargs["entrypoint_num_cpus"] == 0
    assert EXCLUDES is not runtime_env["excludes"]


def test_rayjob_manifest_runs_the_train_stage_on_gpu_workers_with_shared_storage():
    job = yaml.safe_load((REPO / "ray_jobs/k8s/rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m pipelines.train"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    for res in ("requests", "limits"):
        assert worker["resources"][res]["nvidia.com/gpu"] == 1
        assert "nvidia.com/gpu" not in head["resources"][res]
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
        assert "/mnt/shared" in {m["mountPath"] for m in container["volumeMounts"]}
    claims = [v for v in group["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims, "workers mount the shared checkpoint volume"
