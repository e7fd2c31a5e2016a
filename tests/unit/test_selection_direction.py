"""Every choice of "the best" (checkpoint, epoch, trial, Tune's search) follows the metric's
direction: with a lower-is-better primary metric the lowest value wins."""

from __future__ import annotations

import pandas as pd
import pytest

MAE = "val_mae_los_days"
KNOBS = {"num_experts": 4, "top_k": 2, "entropy_weight": 0.0, "gate": "softmax", "lr": 1e-3}
SPACE = {"num_samples": 2, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2, "seed": 0}


def test_checkpoint_with_the_lowest_error_is_chosen(tmp_path):
    from ray.train import Checkpoint

    from ray_jobs.train import best_checkpoint

    kept = []
    for name, metrics in [
        ("worse", {"epoch": 1, MAE: 3.0}),
        ("better", {"epoch": 2, MAE: 1.0}),
        ("unscored", {"epoch": 3}),  # e.g. a report without the metric: it must never win
    ]:
        (tmp_path / name).mkdir()
        kept.append((Checkpoint.from_directory(str(tmp_path / name)), metrics))
    checkpoint, metrics = best_checkpoint(kept, MAE)
    assert metrics["epoch"] == 2 and checkpoint.path.endswith("better")
    assert best_checkpoint(kept[::-1], MAE)[1]["epoch"] == 2  # not the order Ray kept them in


@pytest.mark.parametrize(("metric", "mode"), [(MAE, "min"), ("val_auroc_ihm", "max")])
def test_tune_searches_and_stops_trials_in_the_metrics_direction(metric, mode):
    from ray_jobs.tune import tune_config

    cfg = tune_config(SPACE, metric, None)
    assert (cfg.metric, cfg.mode) == (metric, mode)


def trial_result(trial_id: str, maes: list[float]):
    from ray.tune import Result

    frame = pd.DataFrame({"epoch": range(1, len(maes) + 1), MAE: maes})
    return Result(
        metrics={"trial_id": trial_id, "config": KNOBS, MAE: maes[-1]},
        checkpoint=None,
        error=None,
        path=f"/nowhere/trial_{trial_id}",
        metrics_dataframe=frame,
    )


def test_a_trial_is_scored_by_its_lowest_error_epoch():
    from ray_jobs.tune import _trial_row

    row = _trial_row(trial_result("a", [3.0, 1.5, 2.0]), MAE, max_epochs=3)
    assert (row["best_metric"], row["best_epoch"], row["status"]) == (1.5, 2, "completed")


def test_the_trial_with_the_lowest_error_is_the_best_trial():
    from ray_jobs.tune import _trial_row, best_trial

    rows = [
        _trial_row(trial_result(t, maes), MAE, max_epochs=2)
        for t, maes in [("high", [4.0, 3.0]), ("low", [2.5, 1.0]), ("mid", [2.0, 2.2])]
    ]
    assert best_trial(rows, MAE)["trial_id"] == "low"
