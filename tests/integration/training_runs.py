"""Helpers shared by the Ray Train integration tests: a training function that records what each
attempt restored and reported (and can kill rank 0 once), and what to compare between runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SLOW_SAMPLE_S = 0.05
# The model of every end-to-end test: as small as FuseMoE gets while still routing (4 experts, top-2).
TINY_MODEL = dict(
    d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=4, top_k=2, expert_hidden=32
)


def recording_train(
    events: Path,
    crash_after_epoch: int = 0,
    marker: Path | None = None,
    slow_after_epoch: int = 0,
):
    """fusemoe.loop.train that logs restores/reports to `events` and, once, kills rank 0 after
    `crash_after_epoch`'s checkpoint is registered (0 = never). After `slow_after_epoch` (0 =
    never) every sample takes SLOW_SAMPLE_S longer to load, so the next epoch lasts long enough
    for a test to interrupt it (the numbers are unchanged)."""

    def train_fn(cfg: dict, report, restore_dir: Path | None = None) -> dict:
        import ray
        import ray.train

        from fusemoe import loop as training_loop

        rank = ray.train.get_context().get_world_rank()

        def log(**event) -> None:
            with events.open("a") as f:
                f.write(json.dumps({"rank": rank, "t": time.time(), **event}) + "\n")

        restored = None
        if restore_dir is not None:
            restored = json.loads((restore_dir / training_loop.STATE_FILE).read_text())["epoch"] + 1
        node = ray.get_runtime_context().get_node_id()
        log(start=True, restored_after_epoch=restored, node=node)

        slow = {"on": bool(slow_after_epoch) and (restored or 0) >= slow_after_epoch}
        if slow_after_epoch:
            from fusemoe.data.dataset import FlexiModalDataset

            load = FlexiModalDataset.__getitem__

            def slow_load(self, i: int) -> dict:
                if slow["on"]:
                    time.sleep(SLOW_SAMPLE_S)
                return load(self, i)

            FlexiModalDataset.__getitem__ = slow_load

        def reporting(metrics: dict, checkpoint_dir: Path) -> None:
            report(metrics, checkpoint_dir)
            log(reported_epoch=int(metrics["epoch"]))
            slow["on"] = slow["on"] or metrics["epoch"] == slow_after_epoch
            if rank == 0 and metrics["epoch"] == crash_after_epoch and not marker.exists():
                # Wait until the controller has registered this checkpoint, then die hard.
                ray.train.get_all_reported_checkpoints()
                marker.touch()
                os._exit(1)

        return training_loop.train(cfg, reporting, restore_dir)

    return train_fn


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def learning_curve(history: list[dict]) -> list[tuple]:
    """What training produced per epoch, without the wall-clock fields."""
    return [
        (h["epoch"], h["lr"], h["train_loss"], h["val_auroc_ihm"], h["val_brier_ihm"])
        for h in history
    ]


def model_weights(checkpoint_dir: Path) -> dict:
    import torch

    return torch.load(checkpoint_dir / "model" / "model.pt", weights_only=True)
