"""The local cluster's shell exports, without starting it: secrets stay in their 0600 files."""

from __future__ import annotations

import subprocess

from ray_jobs.local_cluster import LocalCluster


def _cluster(tmp_path) -> LocalCluster:
    cluster = LocalCluster(tmp_path)
    cluster._write_secrets()
    cluster.state = {
        "s3": {"endpoint": "http://127.0.0.1:9000"},
        "mlflow": {"uri": "http://127.0.0.1:5000"},
        "ray": {
            "gcs_address": "127.0.0.1:6379",
            "dashboard_url": "http://127.0.0.1:8265",
            "tmpdir": "/tmp/ray-lc-x",
        },
    }
    return cluster


def test_env_exports_read_the_mlflow_password_from_its_file_and_never_print_it(tmp_path):
    cluster = _cluster(tmp_path)
    exports = cluster.exports()
    for name in ("admin_password", "pipeline_password", "flask_secret_key"):
        assert cluster.secret(name) not in exports
        assert (cluster.secrets_dir / name).stat().st_mode & 0o777 == 0o600
    shell = subprocess.run(
        ["bash", "-c", f"{exports}\necho $MLFLOW_TRACKING_PASSWORD $RAY_ADDRESS"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert shell.stdout.split() == [cluster.secret("pipeline_password"), "127.0.0.1:6379"]


def test_secrets_survive_a_restart_of_the_cluster_dir(tmp_path):
    first = _cluster(tmp_path).secret("pipeline_password")
    assert _cluster(tmp_path).secret("pipeline_password") == first
