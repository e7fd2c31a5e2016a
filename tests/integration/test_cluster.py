"""The cluster path on the local 3-node cluster: real Ray nodes, moto S3, MLflow with basic auth, a
DVC S3 remote. One session cluster (tests/integration/conftest.py) serves every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from project_copy import commit_all, copy_project
from test_pipeline import REPO, run, tiny_params

from ray_jobs.local_cluster import PIPELINE_USER, mlflow_user

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300


def cluster_env(cluster) -> dict[str, str]:
    return {
        **os.environ,
        **cluster.env(),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }


def test_the_cluster_is_a_cpu_less_head_and_two_worker_nodes_on_loopback(local_cluster):
    nodes = local_cluster.alive_nodes()
    assert len(nodes) == 3
    assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}
    head = [n for n in nodes if n["is_head_node"]]
    assert len(head) == 1 and head[0]["resources_total"].get("CPU", 0) == 0
    assert head[0]["resources_total"]["TRAIN_DRIVER"] > 0
    workers = [n for n in nodes if not n["is_head_node"]]
    assert [w["resources_total"]["CPU"] for w in workers] == [1.0, 1.0]
    secrets = local_cluster.secrets_dir
    assert all((secrets / f).stat().st_mode & 0o077 == 0 for f in os.listdir(secrets))


# ---------------------------------------------------------------- tracking security


@pytest.fixture
def tracking(local_cluster, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_cluster.tracking_uri)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    return local_cluster


def test_an_unauthenticated_tracking_client_is_refused(tracking):
    url = f"{tracking.tracking_uri}/api/2.0/mlflow/experiments/search"
    assert requests.post(url, json={"max_results": 1}, timeout=30).status_code == 401
    wrong = requests.post(url, json={"max_results": 1}, auth=("admin", "wrong"), timeout=30)
    assert wrong.status_code == 401


def test_a_reader_cannot_register_a_version_of_the_model_or_move_its_alias(tracking):
    import mlflow
    from mlflow.exceptions import MlflowException

    name = f"it-model-{uuid.uuid4().hex[:6]}"
    with mlflow_user(PIPELINE_USER, tracking.secret("pipeline_password")):
        mlflow.MlflowClient().create_registered_model(name)
    reader, reader_pw = f"reader-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with tracking.as_admin():
        admin = tracking.admin_client()
        admin.create_user(reader, reader_pw)
        admin.grant_user_permission(reader, "registered_model", name, "READ")
    with mlflow_user(reader, reader_pw):
        client = mlflow.MlflowClient()
        assert client.get_registered_model(name).name == name  # reading is allowed
        attempts = {
            "move an alias": lambda: client.set_registered_model_alias(name, "champion", "1"),
            "add a version": lambda: client.create_model_version(name, source="s3://fusemoe/x"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(MlflowException) as refused:
                attempt()
            assert refused.value.get_http_status_code() == 403, what


def test_the_pipeline_user_manages_the_experiment_it_created_and_is_no_admin(tracking):
    import mlflow

    with mlflow_user(PIPELINE_USER, tracking.secret("pipeline_password")):
        exp_id = mlflow.MlflowClient().get_experiment_by_name("fusemoe").experiment_id
    with tracking.as_admin():
        admin = tracking.admin_client()
        permission = admin.get_user_permission(PIPELINE_USER, "experiment", exp_id)
        assert permission.permission == "MANAGE"
        assert not admin.get_user(PIPELINE_USER).is_admin


# ---------------------------------------------------------------- submission


def test_a_submitted_job_gets_the_project_and_no_credentials_in_its_metadata(local_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = cluster_env(local_cluster)
    probe = (
        "import os, ray_jobs; "
        "print('code from', os.path.dirname(os.path.dirname(os.path.abspath(ray_jobs.__file__)))); "
        "print('params.yaml here', os.path.isfile('params.yaml')); "
        "print('credentials on the node', all(os.environ.get(k) for k in "
        "('AWS_SECRET_ACCESS_KEY', 'MLFLOW_TRACKING_PASSWORD')))"
    )
    job_id = f"it-{uuid.uuid4().hex[:8]}"
    out = run(
        [
            sys.executable,
            "-m",
            "ray_jobs.submit",
            "--submission-id",
            job_id,
            "--follow",
            "--",
            "python",
            "-c",
            probe,
        ],
        REPO,
        env,
    )
    client = JobSubmissionClient(local_cluster.dashboard_url)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job_id)
    assert "params.yaml here True" in logs and "credentials on the node True" in logs
    shipped = next(line for line in logs.splitlines() if line.startswith("code from"))
    assert str(REPO) not in shipped  # the uploaded working_dir, not this checkout
    info = json.dumps(client.get_job_info(job_id).dict(), default=str)
    for name, value in local_cluster.env().items():
        if "PASSWORD" in name or "SECRET" in name:
            assert value not in info and value not in logs and value not in out, name
    for secret in ("admin_password", "pipeline_password", "flask_secret_key"):
        assert local_cluster.secret(secret) not in info + logs + out


def test_a_stage_submitted_with_a_sqlite_tracking_uri_is_refused(local_cluster):
    env = cluster_env(local_cluster) | {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.submit", "--", "train"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: MLflow tracking URI sqlite:///mlflow.db is a local file, but Ray runs on the "
        f"cluster at {local_cluster.dashboard_url}, whose workers cannot reach it: set "
        "MLFLOW_TRACKING_URI to a tracking server (http://...)"
    ]


# ---------------------------------------------------------------- the pipeline on the cluster


@pytest.fixture(scope="module")
def cluster_project(local_cluster, tmp_path_factory):
    """`dvc repro` (prepare -> tune -> train -> evaluate -> register) driven from this machine
    on the cluster, storage on S3, tracking on the server; then `dvc push` to the S3 remote."""
    tmp = tmp_path_factory.mktemp("cluster-repro")
    work = tmp / "project"
    copy_project(work)
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tmp)
    # The synthetic source ignores raw_dir; it only has to exist (a DVC dependency).
    (work / "raw").mkdir()
    (work / "raw/README").write_text("synthetic data: no raw files\n")
    params["data"]["raw_dir"] = "raw"
    params["ray"].update(
        storage_path=local_cluster.storage_uri("it/ray"), num_workers=2, cpus_per_worker=1
    )
    params["tune"].update(max_concurrent_trials=2, cpus_per_trial=1)
    params["mlflow"]["experiment"] = "fusemoe"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = cluster_env(local_cluster) | {"PYTHONPATH": str(work)}
    commit_all(work, env)
    local_cluster.configure_dvc_remote(work)
    t0 = time.monotonic()
    out = run(["dvc", "repro", "register"], work, env)
    out += run(["dvc", "push"], work, env)
    commit_all(work, env, "dvc.lock and outputs of the cluster run")
    return work, env, out, time.monotonic() - t0


def test_the_pipeline_runs_on_the_cluster_with_storage_tracking_and_a_dvc_remote(
    local_cluster, cluster_project
):
    import mlflow
    from pyarrow import fs as pafs

    work, env, out, _ = cluster_project
    registry = json.loads((work / "models/registry.json").read_text())
    assert registry["champion"] is True
    run_json = json.loads((work / "models/train/run.json").read_text())
    assert run_json["ray_checkpoint"].startswith("s3://fusemoe/it/ray/")
    s3 = pafs.S3FileSystem(
        endpoint_override=local_cluster.s3_endpoint,
        scheme="http",
        region="us-east-1",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    checkpoint = run_json["ray_checkpoint"].removeprefix("s3://")
    assert s3.get_file_info(checkpoint).type == pafs.FileType.Directory
    data_hash = run_json["data_hash"]
    manifest = f"fusemoe/it/ray/datasets/{data_hash}/manifest.json"
    assert s3.get_file_info(manifest).type == pafs.FileType.File
    client = mlflow.MlflowClient(local_cluster.tracking_uri)
    with mlflow_user(PIPELINE_USER, local_cluster.secret("pipeline_password")):
        champion = client.get_model_version_by_alias("fusemoe-it", "champion")
        assert str(champion.version) == registry["version"]
        train_run = client.get_run(run_json["mlflow_run_id"])
        assert len(client.get_metric_history(train_run.info.run_id, "val_auroc_ihm")) == 2
        artifacts = train_run.info.artifact_uri
        assert artifacts.startswith("mlflow-artifacts:/")  # proxied by the server...
    stored = f"fusemoe/mlflow-artifacts/{artifacts.removeprefix('mlflow-artifacts:/')}"
    assert (
        s3.get_file_info(f"{stored}/deepspeed_config.json").type == pafs.FileType.File
    )  # ...to S3
    assert local_cluster.secret("pipeline_password") not in out


def test_dvc_pull_into_a_fresh_clone_restores_byte_identical_outputs(
    local_cluster, cluster_project, tmp_path
):
    work, env, _, _ = cluster_project
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    assert not (clone / "models/train").exists()
    assert "cluster" not in (clone / ".dvc/config").read_text()  # remote settings stay local
    local_cluster.configure_dvc_remote(clone)
    run(["dvc", "pull"], clone, env)
    for out in ("data/processed", "models/train"):
        mine = sorted(p.relative_to(work) for p in (work / out).rglob("*") if p.is_file())
        theirs = sorted(p.relative_to(clone) for p in (clone / out).rglob("*") if p.is_file())
        assert mine == theirs and mine
        for rel in mine:
            assert (work / rel).read_bytes() == (clone / rel).read_bytes(), rel
