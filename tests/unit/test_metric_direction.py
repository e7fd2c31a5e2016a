import pytest

from fusemoe.metrics import best_index, higher_is_better, is_better, metric_mode


@pytest.mark.parametrize(
    "metric", ["val_auroc_ihm", "eval_val_auprc_ihm", "val_macro_f1_activity", "test_accuracy_x"]
)
def test_discrimination_metrics_are_higher_is_better(metric):
    assert higher_is_better(metric) and metric_mode(metric) == "max"


@pytest.mark.parametrize(
    "metric", ["val_mae_los_days", "eval_val_rmse_los_days", "val_loss", "val_ece_ihm", "brier"]
)
def test_error_metrics_are_lower_is_better(metric):
    assert not higher_is_better(metric) and metric_mode(metric) == "min"


def test_task_name_containing_a_metric_word_does_not_flip_direction():
    # The task is called "loss_of_function"; the metric is AUROC.
    assert higher_is_better("val_auroc_loss_of_function")


def test_unknown_metric_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="val_wobble_ihm"):
        higher_is_better("val_wobble_ihm")


def test_is_better_respects_direction_and_margin():
    assert is_better(0.9, 0.8, "val_auroc_ihm") and not is_better(0.8, 0.9, "val_auroc_ihm")
    assert is_better(1.0, 2.0, "val_mae_los_days") and not is_better(2.0, 1.0, "val_mae_los_days")
    assert not is_better(0.805, 0.8, "val_auroc_ihm", margin=0.01)
    assert not is_better(1.995, 2.0, "val_mae_los_days", margin=0.01)


def test_best_index_takes_the_lowest_error_and_the_highest_score():
    assert best_index([3.0, 1.5, 2.0], "val_mae_los_days") == 1
    assert best_index([0.7, 0.9, 0.8], "val_auroc_ihm") == 1


@pytest.mark.parametrize("metric", ["val_mae_los_days", "val_auroc_ihm"])
def test_a_missing_or_nan_score_never_wins(metric):
    assert best_index([None, 2.0, float("nan")], metric) == 1


def test_best_index_breaks_ties_by_the_first():
    assert best_index([2.0, 1.0, 1.0], "val_mae_los_days") == 1


def test_best_index_without_any_score_names_the_metric():
    with pytest.raises(ValueError, match="no val_mae_los_days among 2"):
        best_index([None, float("nan")], "val_mae_los_days")
