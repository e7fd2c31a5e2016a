"""The evaluate stage's test-time missingness: at random (MCAR) and least-observed first (MNAR)."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from fusemoe.data.dataset import FlexiModalDataset, collate
from fusemoe.data.synthetic import write_synthetic
from pipelines.evaluate import at_random, drop_least_observed, observation_counts


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn") / "flexi"
    write_synthetic(d, num_stays=400, seed=3)
    return FlexiModalDataset(d, "test")


def presence_after(transform, ds: FlexiModalDataset) -> dict[str, np.ndarray]:
    present: dict[str, list] = {}
    for batch in DataLoader(ds, batch_size=16, collate_fn=collate):
        for m, flags in transform(batch)["present"].items():
            present.setdefault(m, []).append(flags.numpy())
    return {m: np.concatenate(v) for m, v in present.items()}


def test_least_observed_stays_lose_a_modality_first(test_split):
    counts = observation_counts(test_split)
    before = presence_after(lambda b: b, test_split)
    after = presence_after(drop_least_observed(0.5, test_split, seed=0), test_split)
    for m, c in counts.items():
        having = before[m]
        lost = having & ~after[m]
        kept = having & after[m]
        assert lost.sum() == round(0.5 * having.sum()), m
        assert c[lost].max() <= c[kept].min(), m  # nobody kept has fewer observations than one lost
        assert not (after[m] & ~having).any()  # nothing missing comes back


@pytest.mark.parametrize("fraction", [0.0, 0.8])
def test_both_mechanisms_remove_the_requested_share_of_present_modalities(test_split, fraction):
    before = presence_after(lambda b: b, test_split)
    n_present = sum(v.sum() for v in before.values())
    for transform in (at_random(fraction, seed=0), drop_least_observed(fraction, test_split, 0)):
        after = presence_after(transform, test_split)
        removed = n_present - sum(v.sum() for v in after.values())
        assert removed == pytest.approx(fraction * n_present, abs=0.06 * n_present)


def test_dropping_is_reproducible_for_a_seed(test_split):
    a = presence_after(drop_least_observed(0.4, test_split, seed=1), test_split)
    b = presence_after(drop_least_observed(0.4, test_split, seed=1), test_split)
    assert all((a[m] == b[m]).all() for m in a)
