"""The one local cluster (Ray head + 2 worker nodes, moto S3, MLflow with basic auth) per session.

Start-up is the cost (minutes on 2 cores), so every test module that asks for `local_cluster`
shares it; teardown kills every process it started. It is stopped right after the last test that
uses it, not at the end of the session: idle, its Ray nodes and servers kept taking CPU from
every later test on a 2-core machine.
"""

from __future__ import annotations

import os

import pytest

START_TIMEOUT_S = 600
LAST_USER = pytest.StashKey[str]()  # node id of the last collected test that uses the cluster
RUNNING = pytest.StashKey[object]()  # the started LocalCluster, until it is stopped


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the tests that will really run
def pytest_collection_modifyitems(config, items) -> None:
    users = [item.nodeid for item in items if "local_cluster" in item.fixturenames]
    if users:
        config.stash[LAST_USER] = users[-1]


def _stop_cluster(config) -> None:
    """Stops the session's cluster once (its pids may be reused after it is gone)."""
    cluster = config.stash.get(RUNNING, None)
    if cluster is not None:
        del config.stash[RUNNING]
        cluster.stop()
        assert not cluster.running_pids(), "the local cluster left processes behind"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield  # the test's own teardown first (module fixtures built on the cluster)
    if item.nodeid == item.config.stash.get(LAST_USER, None):
        _stop_cluster(item.config)
    return result


@pytest.fixture(scope="session")
def local_cluster(request, tmp_path_factory):
    from ray_jobs.local_cluster import LocalCluster

    if os.environ.get("FUSEMOE_TEST_CLUSTER"):  # a cluster from `up --dir DIR`, kept (development)
        yield LocalCluster.load(os.environ["FUSEMOE_TEST_CLUSTER"])
        return
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), start_timeout_s=START_TIMEOUT_S)
    request.config.stash[RUNNING] = cluster.start()
    try:
        yield cluster
    finally:
        _stop_cluster(request.config)  # unless the last test using it has stopped it already
