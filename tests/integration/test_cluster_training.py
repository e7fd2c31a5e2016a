"""Training on the local three-node cluster (Ray head with no CPUs + two 1-CPU worker nodes, moto
S3, MLflow with basic auth): expert parallelism across nodes with checkpoints on the object store,
a worker node lost mid-epoch, and a Tune search of concurrent multi-worker trials.

Each job runs in a driver process of its own (cluster_driver.py) with the cluster's environment,
as a user's would; its workers record what they restored, reported and where they ran
(training_runs.py). Data, model and epochs are tiny: the cluster's start-up is the cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from training_runs import TINY_MODEL, learning_curve, read_events

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "cluster_driver.py"
EPOCHS = 2
JOB_TIMEOUT_S = 900


def tiny_params(storage: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(TINY_MODEL)
    params["train"].update(
        epochs=EPOCHS,
        batch_size=32,
        tasks=["ihm"],
        seed=0,
        primary_metric="val_auroc_ihm",
        max_train_stays=0,
        lr=0.002,
        lr_schedule="cosine",
        warmup_epochs=1,
    )
    # EP=2 over two 1-CPU nodes: one rank, and half of the experts, per node.
    params["deepspeed"].update(zero_stage=1, precision="fp32", ep_size=2)
    params["ray"].update(
        address="",
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=1,
        max_failures=1,
        keep_checkpoints=2,
        storage_path=storage,
    )
    params["mlflow"]["system_metrics"] = False
    return params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from fusemoe.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("cluster-data") / "processed"
    write_synthetic(out, num_stays=400, seed=0)
    return out


def start_job(cluster, mode: str, spec: dict, tmp: Path) -> subprocess.Popen:
    spec_file = tmp / f"{mode}-spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **cluster.env(), "PYTHONPATH": str(REPO)}
    log = open(tmp / f"{mode}-driver.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(DRIVER), mode, str(spec_file)],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, tmp: Path, mode: str) -> None:
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    log = (tmp / f"{mode}-driver.log").read_text(errors="replace")
    assert rc == 0, f"{mode} driver ended with {rc}:\n{log[-4000:]}"


def train_job(cluster, data_dir: Path, tmp: Path, name: str, **spec) -> dict:
    """Runs one training job to the end; returns its result, weights and worker events."""
    spec = {
        "params": tiny_params(cluster.storage_uri(f"ray/{name}")),
        "data_dir": str(data_dir),
        "name": name,
        "events": str(tmp / "events.jsonl"),
        "out": str(tmp / "out"),
        **spec,
    }
    finish(start_job(cluster, "train", spec, tmp), tmp, "train")
    return collect(tmp)


def collect(tmp: Path) -> dict:
    import torch

    result = json.loads((tmp / "out" / "result.json").read_text())
    weights = torch.load(tmp / "out" / "model.pt", weights_only=True)
    return {**result, "weights": weights, "events": read_events(tmp / "events.jsonl")}


def assert_same_run(got: dict, want: dict) -> None:
    import torch

    assert learning_curve(got["history"]) == pytest.approx(learning_curve(want["history"]))
    assert got["metrics"]["epoch"] == want["metrics"]["epoch"]
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(local_cluster, data_dir, tmp_path_factory) -> dict:
    return train_job(local_cluster, data_dir, tmp_path_factory.mktemp("whole"), "ep2-whole")


def client_env(cluster, monkeypatch, prefixes: tuple[str, ...]) -> None:
    """This test process as a client of the cluster (restored after the test)."""
    for key, value in cluster.env().items():
        if key.startswith(prefixes):
            monkeypatch.setenv(key, value)


def test_ep2_trains_across_both_worker_nodes_with_checkpoints_on_the_object_store(
    local_cluster, uninterrupted, monkeypatch
):
    import pyarrow.fs as pafs

    starts = [e for e in uninterrupted["events"] if e.get("start")]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert len({e["node"] for e in starts}) == 2, "one EP rank per worker node"
    assert uninterrupted["data_dir"].startswith("s3://")
    assert [h["epoch"] for h in uninterrupted["history"]] == list(range(1, EPOCHS + 1))

    client_env(local_cluster, monkeypatch, ("AWS_",))
    fs, path = pafs.FileSystem.from_uri(local_cluster.storage_uri("ray/ep2-whole/ep2-whole"))
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    experts = {f.rsplit("/", 1)[1] for f in files if "layer_0_expert_" in f}
    assert experts == {f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)}


def test_ep2_killed_after_an_epoch_resumes_from_the_object_store_to_the_same_result(
    local_cluster, data_dir, uninterrupted, tmp_path
):
    got = train_job(
        local_cluster,
        data_dir,
        tmp_path,
        "ep2-crash",
        crash_after_epoch=1,
        marker=str(tmp_path / "crashed"),
    )
    starts = [(e["rank"], e["restored_after_epoch"]) for e in got["events"] if e.get("start")]
    assert Counter(starts) == Counter([(0, None), (1, None), (0, 1), (1, 1)])
    assert_same_run(got, uninterrupted)


def test_a_worker_node_lost_mid_epoch_is_replaced_and_the_run_ends_as_if_uninterrupted(
    local_cluster, data_dir, uninterrupted, tmp_path, monkeypatch
):
    import pyarrow.fs as pafs

    name = "ep2-node-loss"
    spec = {
        "params": tiny_params(local_cluster.storage_uri(f"ray/{name}")),
        "data_dir": str(data_dir),
        "name": name,
        "events": str(tmp_path / "events.jsonl"),
        "out": str(tmp_path / "out"),
        "slow_after_epoch": 1,  # epoch 2 lasts seconds: the node dies inside it
    }
    client_env(local_cluster, monkeypatch, ("AWS_",))
    fs, run_path = pafs.FileSystem.from_uri(local_cluster.storage_uri(f"ray/{name}/{name}"))
    proc = start_job(local_cluster, "train", spec, tmp_path)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # Epoch 1's checkpoint is on the object store: epoch 2 is under way.
    while not any(
        i.base_name.startswith("checkpoint_")
        for i in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    ):
        assert proc.poll() is None, (tmp_path / "train-driver.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    # A worker node disappears without warning; a fresh node joins.
    victim = next(i for i, w in enumerate(local_cluster.state["ray"]["workers"]) if w["alive"])
    local_cluster.kill_worker_node(victim)
    local_cluster.add_worker_node(timeout_s=600)
    finish(proc, tmp_path, "train")

    got = collect(tmp_path)
    attempts = [e for e in got["events"] if e.get("start")]
    assert len(attempts) == 4, "the group was started again after the node loss"
    assert_same_run(got, uninterrupted)


def test_tune_runs_two_concurrent_two_worker_trials_and_resumes_an_interrupted_search(
    local_cluster, data_dir, tmp_path, monkeypatch
):
    import mlflow

    params = tiny_params(local_cluster.storage_uri("ray/tune"))
    params["data"].update(out_dir=str(data_dir), source="synthetic")
    # Two trials at once, each a TorchTrainer of 2 workers on the two 1-CPU nodes: half a CPU
    # per worker; the trials themselves hold only the head's TRAIN_DRIVER resource.
    params["ray"]["cpus_per_worker"] = 0.5
    params["deepspeed"]["ep_size"] = 1
    params["mlflow"].update(tracking_uri=local_cluster.tracking_uri, experiment="cluster-tune")
    params["tune"].update(
        num_samples=2,
        max_epochs=EPOCHS,
        grace_period=EPOCHS,
        trial_workers=2,
        max_concurrent_trials=2,
        num_experts=[2, 4],
        top_k=[1, 2],
        entropy_weight=[0.0, 0.1],
        gate=["softmax", "laplace"],
        lr={"low": 1e-3, "high": 1e-2, "log": True},
    )
    spec = {"params": params, "out": str(tmp_path), "marker": str(tmp_path / "interrupted")}
    finish(start_job(local_cluster, "tune", spec, tmp_path), tmp_path, "tune")

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["failed"] == 0
    assert summary["ray_experiment"].startswith("s3://")
    client_env(local_cluster, monkeypatch, ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    client = mlflow.MlflowClient(local_cluster.tracking_uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    ids = [r.data.tags["ray_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == 2, "no trial lost or repeated"
    assert (tmp_path / "interrupted").read_text() in ids
    # Both trials were under way at once (before the first of them ended).
    assert max(r.info.start_time for r in children) < min(r.info.end_time for r in children)
    for run in children:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auroc_ihm")]
        assert steps == sorted(set(steps)) and steps[-1] == EPOCHS
