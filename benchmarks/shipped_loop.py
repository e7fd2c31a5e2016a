"""Benchmarks train through the shipped loop (issue 17: one training loop).

`train_keeping_best` runs ``fusemoe.loop.train`` (the function the train stage's Ray workers run;
here on its own one-rank gloo group) and keeps the model of the epoch best on
``train.primary_metric`` by ``fusemoe.metrics.is_better``, so a benchmark measures what users train.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LOOP = "fusemoe.loop.train"  # recorded in the benchmarks' JSON


@dataclass
class Trained:
    """The best epoch's model (eval mode), its reported metrics, and every epoch's metrics."""

    model: torch.nn.Module
    best: dict
    history: list[dict]


def train_keeping_best(
    data_dir: Path | str, sections: dict, seed: int, log: Callable = print
) -> Trained:
    """Trains with the params.yaml-style sections ``model``, ``train`` and ``deepspeed``
    (``train.seed`` is set to `seed`) and returns the model of the best validation epoch."""
    from fusemoe.loop import train
    from fusemoe.metrics import is_better
    from fusemoe.model_io import load_model

    tcfg = sections["train"] | {"seed": seed}
    primary = tcfg["primary_metric"]
    cfg = {
        "data_dir": str(data_dir),
        "model": sections["model"],
        "train": tcfg,
        "deepspeed": sections["deepspeed"],
    }
    with tempfile.TemporaryDirectory(prefix="fusemoe-best-") as tmp:
        best_dir, best = Path(tmp) / "model", {}

        def keep_best(metrics: dict, ckpt: Path) -> None:
            # The loop deletes ckpt after this returns: copy the model of a better epoch.
            if not best or is_better(metrics[primary], best[primary], primary):
                shutil.rmtree(best_dir, ignore_errors=True)
                shutil.copytree(ckpt / "model", best_dir)
                best.clear()
                best.update(metrics)

        out = train(cfg, keep_best, log=log)
        model, _ = load_model(best_dir)
    model.eval()
    return Trained(model=model, best=dict(best), history=out["history"])
