"""benchmarks/shipped_loop.py: benchmarks train through fusemoe.loop.train and keep the model of
the best validation epoch (issue 17: one training loop)."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from batches import TINY_MODEL  # noqa: E402

from benchmarks.shipped_loop import train_keeping_best  # noqa: E402
from fusemoe.data.dataset import FlexiModalDataset, collate, dataset_spec  # noqa: E402
from fusemoe.data.flexi import load_manifest, write_flexi  # noqa: E402
from fusemoe.data.synthetic import synthesize  # noqa: E402
from fusemoe.inference import predict  # noqa: E402
from fusemoe.loop import select_tasks  # noqa: E402
from fusemoe.metrics import best_index, task_metrics  # noqa: E402

MODEL = TINY_MODEL | dict(gate="softmax", router="joint", dropout=0.0)
PRIMARY = "val_auroc_ihm"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = tmp_path_factory.mktemp("flexi") / "synthetic"
    stays, events, manifest, _ = synthesize(120, seed=0)
    write_flexi(data, stays, events, manifest)
    sections = {
        "model": MODEL,
        "train": {
            "tasks": ["ihm"],
            "primary_metric": PRIMARY,
            "epochs": 4,
            "batch_size": 32,
            "lr": 0.01,
            "weight_decay": 0.0,
        },
        "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0, "ep_size": 1},
    }
    return data, train_keeping_best(data, sections, seed=0, log=lambda *_: None)


def test_kept_model_is_the_best_validation_epoch_and_rescores_to_its_reported_metric(trained):
    data, result = trained
    scores = [h[PRIMARY] for h in result.history]
    assert len(scores) == 4
    assert result.best["epoch"] == best_index(scores, PRIMARY) + 1
    assert result.best[PRIMARY] == scores[best_index(scores, PRIMARY)]
    assert not result.model.training
    spec = select_tasks(dataset_spec(load_manifest(data)), ["ihm"])
    loader = DataLoader(FlexiModalDataset(data, "val"), batch_size=64, collate_fn=collate)
    rescored = task_metrics(predict(result.model, loader, torch.device("cpu")), spec, "val")
    assert rescored[PRIMARY] == pytest.approx(result.best[PRIMARY], abs=1e-6)
