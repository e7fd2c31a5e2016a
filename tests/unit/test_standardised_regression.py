"""Regression targets are standardised with train-split statistics (issue 17: length of stay as
an auxiliary task without its raw-day loss swamping the mortality loss), and train.task_weights
weighs each task's loss."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from batches import TINY_MODEL
from torch.utils.data import DataLoader

from fusemoe.data.dataset import (
    FlexiModalDataset,
    TaskSpec,
    collate,
    dataset_spec,
    standardise_regression,
)
from fusemoe.data.flexi import load_manifest, write_flexi
from fusemoe.data.synthetic import synthesize
from fusemoe.inference import predict
from fusemoe.loop import select_tasks, train
from fusemoe.model_io import load_model
from fusemoe.nn.losses import task_loss

BINARY = TaskSpec("ihm", "binary")
LOS = TaskSpec("los_days", "regression", target_mean=10.0, target_std=8.0)


def test_regression_loss_is_the_huber_of_the_error_in_train_stds():
    logits = {"los_days": torch.tensor([18.0, 10.0])}  # errors of 1 std and 0
    labels = {"los_days": torch.tensor([10.0, 10.0])}
    # Huber(delta 1) of a 1-std error is 0.5; in raw days it would be 7.5.
    assert task_loss(logits, labels, [LOS]).item() == pytest.approx(0.25)


def test_task_weights_give_the_weighted_mean_of_the_task_losses():
    logits = {"ihm": torch.tensor([0.0, 0.0]), "los_days": torch.tensor([18.0, 10.0])}
    labels = {"ihm": torch.tensor([1.0, 0.0]), "los_days": torch.tensor([10.0, 10.0])}
    bce = float(np.log(2.0))
    got = task_loss(logits, labels, [BINARY, LOS], {"los_days": 0.25}).item()
    assert got == pytest.approx((bce + 0.25 * 0.25) / 1.25)
    assert task_loss(logits, labels, [BINARY, LOS]).item() == pytest.approx((bce + 0.25) / 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("los") / "synthetic"
    stays, events, manifest, _ = synthesize(120, seed=0)
    write_flexi(out, stays, events, manifest)
    return out


def test_statistics_are_those_of_the_labelled_train_stays(data):
    spec = standardise_regression(
        select_tasks(dataset_spec(load_manifest(data)), ["ihm", "los_days"]), data
    )
    stays = pq.read_table(data / "stays.parquet").to_pandas()
    y = stays.loc[stays["split"] == "train", "los_days"].dropna().to_numpy(np.float64)
    los = spec.tasks[1]
    assert (los.target_mean, los.target_std) == pytest.approx((y.mean(), y.std()), rel=1e-5)
    assert spec.tasks[0] == TaskSpec("ihm", "binary")


def test_trained_model_predicts_days_with_the_saved_train_statistics(data, tmp_path):
    cfg = {
        "data_dir": str(data),
        "model": TINY_MODEL | dict(gate="softmax", router="joint"),
        "train": {
            "tasks": ["ihm", "los_days"],
            "task_weights": {"los_days": 0.3},
            "primary_metric": "val_auroc_ihm",
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.01,
            "weight_decay": 0.0,
            "seed": 0,
        },
        "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0, "ep_size": 1},
    }
    saved = tmp_path / "model"
    metrics = train(
        cfg, lambda m, ckpt: shutil.copytree(ckpt / "model", saved), log=lambda *_: None
    )
    model, spec = load_model(saved)
    los = spec.tasks[1]
    assert los.target_std > 1.0  # days, not a unit-scale default
    with torch.no_grad():
        model.heads["los_days"].weight.zero_()
        model.heads["los_days"].bias.zero_()
    # A head that outputs 0 standardised predicts the train mean in days.
    loader = DataLoader(FlexiModalDataset(data, "val"), batch_size=64, collate_fn=collate)
    pred = predict(model, loader, torch.device("cpu"))
    assert np.allclose(pred["logits"]["los_days"], los.target_mean, rtol=1e-5)
    assert np.isfinite(metrics["metrics"]["val_mae_los_days"])
