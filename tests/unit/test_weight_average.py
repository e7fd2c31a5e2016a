"""train.ema_decay: the loop validates and saves an exponential moving average of the weights
(issue 17, weight averaging instead of picking one epoch), and a resumed run continues the
average exactly where it stopped."""

import shutil
from pathlib import Path

import pytest
import torch
from batches import TINY_MODEL

from fusemoe.data.flexi import write_flexi
from fusemoe.data.synthetic import synthesize
from fusemoe.loop import EMA_FILE, train, weight_average
from fusemoe.model_io import MODEL_FILE

MODEL = TINY_MODEL | dict(gate="laplace", router="per_modality", dropout=0.1)
DECAY = 0.9


def test_averaged_weights_are_the_hand_computed_ema_of_the_steps():
    net = torch.nn.Linear(3, 2)
    ema = weight_average(net, DECAY)
    expected = None
    for step in range(4):
        with torch.no_grad():
            net.weight.add_(float(step + 1))
        ema.update_parameters(net)
        w = net.weight.detach().clone()
        expected = w if expected is None else DECAY * expected + (1 - DECAY) * w
    assert torch.allclose(ema.module.weight, expected)


def test_ema_decay_zero_is_off_and_out_of_range_is_rejected():
    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    with pytest.raises(ValueError, match="train.ema_decay=1.0"):
        weight_average(torch.nn.Linear(2, 2), 1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 3-epoch run, and one resumed from its epoch-1 checkpoint."""
    root = tmp_path_factory.mktemp("ema")
    data = root / "synthetic"
    stays, events, manifest, _ = synthesize(120, seed=0)
    write_flexi(data, stays, events, manifest)
    cfg = {
        "data_dir": str(data),
        "model": MODEL,
        "train": {
            "tasks": ["ihm"],
            "primary_metric": "val_auroc_ihm",
            "epochs": 3,
            "batch_size": 16,
            "lr": 0.01,
            "weight_decay": 0.0,
            "seed": 0,
            "ema_decay": DECAY,
        },
        "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0, "ep_size": 1},
    }

    def run(name: str, restore: Path | None = None) -> dict:
        kept = {}

        def keep(metrics: dict, ckpt: Path) -> None:
            shutil.copytree(ckpt, root / name / str(metrics["epoch"]), dirs_exist_ok=True)

        kept["history"] = train(cfg, keep, restore_dir=restore, log=lambda *_: None)["history"]
        kept["dir"] = root / name
        return kept

    full = run("full")
    resumed = run("resumed", restore=full["dir"] / "1")
    return full, resumed


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt / "model" / MODEL_FILE, weights_only=True)


def test_saved_model_is_the_average_not_the_last_step(runs):
    full, _ = runs
    ckpt = full["dir"] / "3"
    ema = torch.load(ckpt / EMA_FILE.format(rank=0), weights_only=True)
    raw = torch.load(ckpt / "ckpt" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    saved = _weights(ckpt)
    assert int(ema["n_averaged"]) == 3 * 6  # one per optimizer step: 6 batches an epoch
    for name, value in saved.items():
        assert torch.equal(value, ema[f"module.{name}"]), name
    assert any(not torch.equal(saved[n], raw[n]) for n in saved)


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("epoch_s", "samples_per_s")} for m in history]


def test_a_resumed_run_averages_on_to_the_uninterrupted_metrics_and_weights(runs):
    full, resumed = runs
    assert _without_timing(resumed["history"]) == _without_timing(full["history"])
    final_full, final_resumed = _weights(full["dir"] / "3"), _weights(resumed["dir"] / "3")
    assert all(torch.equal(final_full[n], final_resumed[n]) for n in final_full)
