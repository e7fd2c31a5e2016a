"""ray.storage_path as a path or a pyarrow URI, and the tracking-store reachability rule."""

from __future__ import annotations

import pytest

from ray_jobs import storage


def test_a_uri_keeps_its_endpoint_query_when_path_parts_are_joined():
    uri = "s3://bucket/ray?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    assert storage.join(uri, "run", "COMPLETE") == (
        "s3://bucket/ray/run/COMPLETE?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    )
    assert storage.join("s3://bucket/ray/", "x") == "s3://bucket/ray/x"


def test_a_relative_path_is_made_absolute_and_a_uri_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/ray") == str(tmp_path / "runs/ray")
    assert storage.resolve("s3://bucket/ray") == "s3://bucket/ray"
    assert storage.is_remote("s3://b/p") and not storage.is_remote("/abs/p")
    assert not storage.is_remote("file:///abs/p")


def test_markers_round_trip_on_a_local_storage_path(tmp_path):
    marker = storage.join(str(tmp_path / "ray"), "run", "mlflow_run_id")
    assert not storage.exists(marker)
    storage.write_text(marker, "abc123")
    assert storage.exists(marker) and storage.read_text(marker) == "abc123"
    storage.delete_dir(storage.join(str(tmp_path / "ray"), "run"))
    assert not storage.exists(marker)


def test_a_local_dataset_is_used_in_place_when_storage_is_local(tmp_path):
    assert storage.dataset_uri(tmp_path / "data", str(tmp_path / "ray"), "h") == str(
        tmp_path / "data"
    )


@pytest.mark.parametrize(
    "uri", ["sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "mlruns", "file:///m"]
)
def test_a_local_tracking_store_with_a_cluster_is_refused(uri):
    with pytest.raises(ValueError, match="is a local file, but Ray runs on the cluster at h:6379"):
        storage.require_reachable_tracking(uri, "h:6379")
    storage.require_reachable_tracking(uri, None)  # embedded Ray: workers share the disk


def test_a_tracking_server_with_a_cluster_is_accepted():
    storage.require_reachable_tracking("http://mlflow:5000", "h:6379")


@pytest.mark.slow  # starts two Python processes that import Ray
@pytest.mark.parametrize("stage", ["train", "tune"])
def test_a_stage_with_a_remote_cluster_and_the_default_sqlite_uri_stops_in_one_line(
    stage, tmp_path
):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["use_best_params"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-m", f"pipelines.{stage}", "--params", "params.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking URI sqlite:///")
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()
