"""The training loop's fast paths keep its contract: length-bucketed training batches are
deterministic (same seed + config, same metrics), and validation scored in length order gives
the metrics of scoring the checkpoint in file order (a prediction never depends on its batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

TRAIN_TWICE = """
import json, sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from fusemoe.data.dataset import FlexiModalDataset, collate
from fusemoe.data.synthetic import write_synthetic
from fusemoe.inference import predict
from fusemoe.loop import select_tasks, train
from fusemoe.metrics import task_metrics
from fusemoe.model_io import load_model

out = Path(sys.argv[1])
write_synthetic(out / "data", num_stays=200, seed=1)
model = dict(d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=4, top_k=2,
             expert_hidden=16, gate="laplace", router="per_modality", dropout=0.1)
cfg = {"data_dir": str(out / "data"), "model": model,
       "train": {"tasks": ["ihm"], "epochs": 2, "batch_size": 16, "lr": 0.01,
                 "weight_decay": 0.0, "seed": 0, "bucket_by_length": True},
       "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0}}
runs = []
for _ in range(2):
    kept = {}
    def keep(metrics, ckpt):
        net, spec = load_model(ckpt / "model")
        val = DataLoader(FlexiModalDataset(out / "data", "val"), batch_size=7, collate_fn=collate)
        kept[metrics["epoch"]] = task_metrics(predict(net, val, torch.device("cpu")), spec, "val")
    history = train(cfg, keep, log=lambda *a: None)["history"]
    runs.append({"history": history, "rescored": kept})
(out / "runs.json").write_text(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("loop")
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_TWICE, str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "runs.json").read_text())


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("epoch_s", "samples_per_s")} for m in history]


def test_bucketed_training_gives_the_same_metrics_for_the_same_seed_and_config(runs):
    assert _without_timing(runs[0]["history"]) == _without_timing(runs[1]["history"])


def test_validation_in_length_order_equals_scoring_the_checkpoint_in_file_order(runs):
    for metrics in runs[0]["history"]:
        rescored = runs[0]["rescored"][str(metrics["epoch"])]
        for key, value in rescored.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
