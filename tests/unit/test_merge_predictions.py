"""Validation split over ranks: the gathered parts are one prediction of the whole split."""

import numpy as np
import pytest

from fusemoe.inference import merge_predictions


def part(ids: list[str], logits: list[float], usage: float | None) -> dict:
    n = len(ids)
    return {
        "stay_id": ids,
        "logits": {"ihm": np.asarray(logits, np.float32)} if n else {},
        "labels": {"ihm": np.arange(n, dtype=np.float32) % 2} if n else {},
        "present": {"vitals": np.ones(n, bool)} if n else {},
        "expert_usage": None if usage is None else np.full((2, 4), usage),
    }


def test_merged_parts_keep_every_stay_in_order_and_average_usage_over_all_samples():
    merged = merge_predictions(
        [part(["a", "b", "c"], [0.1, 0.2, 0.3], 1.0), part(["d"], [0.4], 5.0)]
    )
    assert merged["stay_id"] == ["a", "b", "c", "d"]
    assert merged["logits"]["ihm"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert merged["labels"]["ihm"].tolist() == [0, 1, 0, 0]
    assert merged["present"]["vitals"].all() and len(merged["present"]["vitals"]) == 4
    assert merged["expert_usage"] == pytest.approx(np.full((2, 4), (3 * 1.0 + 5.0) / 4))


def test_a_rank_without_validation_stays_adds_nothing():
    merged = merge_predictions([part([], [], None), part(["a"], [0.5], None)])
    assert merged["stay_id"] == ["a"] and merged["expert_usage"] is None


def test_merging_nothing_is_an_error():
    with pytest.raises(ValueError, match="every part is empty"):
        merge_predictions([part([], [], None)])
