"""The one local cluster (Ray head + 2 worker nodes, moto S3, MLflow with basic auth) per session.

Start-up is the cost (minutes on 2 cores), so every test module that asks for `local_cluster`
shares it; teardown kills every process it started.
"""

from __future__ import annotations

import pytest

START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    from ray_jobs.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), start_timeout_s=START_TIMEOUT_S)
    with cluster:
        yield cluster
    assert not cluster.running_pids(), "the local cluster left processes behind"
