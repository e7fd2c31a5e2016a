"""Fault tolerance of the Ray Train + DeepSpeed job: real Ray, real DeepSpeed (CPU, gloo), real MLflow.

Failures are injected by a test-only wrapper around fusemoe.loop.train (run_training's `train_fn`):
rank 0 calls os._exit(1) once, right after an epoch's checkpoint is registered with Ray Train. A
marker file makes the restarted attempt run normally. Every attempt appends what it restored and
what it reported to a JSON-lines event log in tmp_path, which the tests read back.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
from training_runs import TINY_MODEL, learning_curve, model_weights, read_events, recording_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3
LR = 0.002


def tiny_params(storage: Path, num_workers: int = 1, max_failures: int = 1) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(TINY_MODEL)
    params["train"].update(
        epochs=EPOCHS,
        batch_size=32,
        tasks=["ihm"],
        seed=0,
        primary_metric="val_auroc_ihm",
        max_train_stays=0,
        # A schedule whose state must survive a restart (DeepSpeed checkpoints it).
        lr=LR,
        lr_schedule="cosine",
        warmup_epochs=1,
    )
    params["deepspeed"].update(zero_stage=0, precision="fp32", ep_size=1)
    params["ray"].update(
        num_workers=num_workers,
        use_gpu=False,
        cpus_per_worker=1,
        num_cpus=2,
        max_failures=max_failures,
        keep_checkpoints=2,
        storage_path=str(storage),
    )
    params["mlflow"]["system_metrics"] = False
    return params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from fusemoe.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data") / "processed"
    write_synthetic(out, num_stays=300, seed=0)
    return out


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: its startup is the slowest part on 2 cores."""
    import ray

    from ray_jobs.train import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray({"num_cpus": 2})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(ray_session, data_dir, tmp_path_factory) -> dict:
    """An uninterrupted 2-worker run (ZeRO-1: optimizer state sharded per rank), tracked in MLflow."""
    import mlflow

    from ray_jobs.train import run_training

    tmp = tmp_path_factory.mktemp("two-workers")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ft")).info.run_id
    events = tmp / "events.jsonl"
    best_dir, _, history = run_training(
        two_worker_params(tmp / "ray"),
        data_dir,
        "two-workers",
        mlflow_run_id=run_id,
        tracking_uri=uri,
        train_fn=recording_train(events),
    )
    return {
        "best_dir": best_dir,
        "history": history,
        "events": read_events(events),
        "client": client,
        "run_id": run_id,
    }


def two_worker_params(storage: Path, max_failures: int = 1, ep_size: int = 1) -> dict:
    params = tiny_params(storage, num_workers=2, max_failures=max_failures)
    params["deepspeed"].update(zero_stage=1, ep_size=ep_size)
    return params


def test_a_killed_worker_is_restarted_and_resumes_to_the_uninterrupted_result(
    two_workers, data_dir, tmp_path
):
    from ray_jobs.train import run_training

    events = tmp_path / "events.jsonl"
    train_fn = recording_train(events, crash_after_epoch=1, marker=tmp_path / "crashed")
    _, _, history = run_training(
        two_worker_params(tmp_path / "ray", max_failures=1),
        data_dir,
        "crash-once",
        train_fn=train_fn,
    )

    assert (tmp_path / "crashed").exists()
    log = read_events(events)
    starts = [(e["rank"], e["restored_after_epoch"]) for e in log if e.get("start")]
    # Both ranks of the second attempt restore epoch 1's checkpoint, not step 0.
    assert Counter(starts) == Counter([(0, None), (1, None), (0, 1), (1, 1)])
    reported = [e["reported_epoch"] for e in log if "reported_epoch" in e and e["rank"] == 0]
    assert reported == [1, 2, 3], "no epoch is lost or trained twice"
    assert learning_curve(history) == pytest.approx(learning_curve(two_workers["history"]))


def test_cosine_schedule_warms_up_for_one_epoch_then_decays_to_its_floor(two_workers):
    lrs = [h["lr"] for h in two_workers["history"]]
    assert lrs[0] == pytest.approx(LR)  # end of the warmup epoch
    assert lrs[0] > lrs[1] > lrs[2] == pytest.approx(0.05 * LR)


def test_rerunning_an_interrupted_run_with_the_same_name_resumes_it(
    ray_session, data_dir, tmp_path
):
    from ray_jobs.train import run_training

    events = tmp_path / "events.jsonl"
    params = tiny_params(tmp_path / "ray", max_failures=0)
    crash = recording_train(events, crash_after_epoch=2, marker=tmp_path / "crashed")
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray wraps the dead worker in
        run_training(params, data_dir, "interrupted", train_fn=crash)
    assert [e["reported_epoch"] for e in read_events(events) if "reported_epoch" in e] == [1, 2]

    events.unlink()
    _, best_metrics, history = run_training(
        params, data_dir, "interrupted", train_fn=recording_train(events)
    )

    log = read_events(events)
    assert [e["restored_after_epoch"] for e in log if e.get("start")] == [2]
    assert [e["reported_epoch"] for e in log if "reported_epoch" in e] == [3]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert 0.0 <= best_metrics["val_auroc_ihm"] <= 1.0


def test_two_workers_merge_every_ranks_checkpoint_and_only_rank_0_logs_to_mlflow(two_workers):
    best_dir, client, run_id = two_workers["best_dir"], two_workers["client"], two_workers["run_id"]
    assert [h["epoch"] for h in two_workers["history"]] == list(range(1, EPOCHS + 1))
    assert {e["rank"] for e in two_workers["events"] if "reported_epoch" in e} == {0, 1}
    merged = {str(p.relative_to(best_dir)) for p in best_dir.rglob("*") if p.is_file()}
    shards = {f"ckpt/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert shards <= merged, f"per-rank optimizer shards missing from {sorted(merged)}"
    assert {"train_state.json", "model/model.pt"} <= merged
    for name in ("train_loss", "val_auroc_ihm"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{name} logged once per epoch"


def test_two_workers_split_validation_yet_report_the_metrics_of_the_whole_split(
    two_workers, data_dir
):
    """Each rank scores half of the validation stays; the gathered metrics equal a re-scoring
    of the saved model over the whole split in one process."""
    import torch
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.inference import predict
    from fusemoe.metrics import task_metrics
    from fusemoe.model_io import load_model

    model, spec = load_model(two_workers["best_dir"] / "model")
    val = DataLoader(FlexiModalDataset(data_dir, "val"), batch_size=64, collate_fn=collate)
    rescored = task_metrics(predict(model, val, torch.device("cpu")), spec, "val")
    best = json.loads((two_workers["best_dir"] / "train_state.json").read_text())["history"]
    reported = best[-1]
    for name in ("val_auroc_ihm", "val_auprc_ihm", "val_brier_ihm"):
        assert reported[name] == pytest.approx(rescored[name], abs=1e-6), name


def test_an_expert_parallel_run_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(
    ray_session, data_dir, tmp_path
):
    """EP=2 over 2 workers: each rank checkpoints only its own experts (one DeepSpeed file per
    expert) and the restarted group loads them back."""
    import torch

    from ray_jobs.train import run_training

    whole_dir, whole_metrics, whole = run_training(
        two_worker_params(tmp_path / "whole", ep_size=2), data_dir, "ep2-whole"
    )
    events = tmp_path / "events.jsonl"
    crash = recording_train(events, crash_after_epoch=1, marker=tmp_path / "crashed")
    best_dir, best_metrics, history = run_training(
        two_worker_params(tmp_path / "crash", ep_size=2), data_dir, "ep2-crash", train_fn=crash
    )

    starts = [(e["rank"], e["restored_after_epoch"]) for e in read_events(events) if e.get("start")]
    assert Counter(starts) == Counter([(0, None), (1, None), (0, 1), (1, 1)])
    expert_files = {p.name for p in best_dir.glob("ckpt/layer_0_expert_*_model_states.pt")}
    assert len(expert_files) == 4, sorted(expert_files)  # num_experts=4, two per rank
    assert learning_curve(history) == pytest.approx(learning_curve(whole))
    assert best_metrics["epoch"] == whole_metrics["epoch"]
    want = model_weights(whole_dir)
    got = model_weights(best_dir)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, msg=name)
