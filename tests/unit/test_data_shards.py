"""Per-rank shards of the training stays: each rank reads only its stays, all ranks together read
every stay exactly once, every rank runs the same number of batches, and one rank batches exactly
as DistributedSampler + DataLoader do."""

import numpy as np
import pytest
from torch.utils.data import DataLoader, DistributedSampler

from fusemoe.data.dataset import FlexiModalDataset, ShardBatches
from fusemoe.data.synthetic import write_synthetic


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "processed"
    write_synthetic(out, num_stays=60, seed=0)
    return out


def samples_equal(a: dict, b: dict) -> bool:
    same = all(
        np.array_equal(a["series"][m][k], b["series"][m][k])
        for m in a["series"]
        for k in ("times", "values", "mask")
    )
    return same and np.array_equal(a["static"]["values"], b["static"]["values"])


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_cover_the_split_and_hold_the_same_samples(data_dir, world):
    full = FlexiModalDataset(data_dir, "train")
    shards = [FlexiModalDataset(data_dir, "train", shard=(r, world)) for r in range(world)]

    ids = [s for shard in shards for s in shard.stay_ids]
    assert sorted(ids) == sorted(full.stay_ids) and len(set(ids)) == len(ids)
    assert {shard.split_size for shard in shards} == {len(full)}
    where = {s: i for i, s in enumerate(full.stay_ids)}
    for shard in shards:
        assert all(samples_equal(shard[j], full[where[s]]) for j, s in enumerate(shard.stay_ids))


def test_a_shard_reads_only_the_events_of_its_stays(data_dir):
    full = FlexiModalDataset(data_dir, "train")
    half = FlexiModalDataset(data_dir, "train", shard=(1, 2))
    for name, series in half.series.items():
        assert 0 < series.obs_val.size < full.series[name].obs_val.size


@pytest.mark.parametrize(("split_size", "world", "batch_size"), [(41, 2, 4), (9, 2, 4), (10, 3, 3)])
def test_every_rank_runs_the_same_batches_and_each_stay_is_seen_once_per_epoch(
    split_size, world, batch_size
):
    num_batches = ShardBatches.per_rank(split_size, world, batch_size)
    for epoch in range(2):
        seen, counts = [], set()
        for rank in range(world):
            shard = list(range(split_size))[rank::world]  # global index of each local stay
            sampler = ShardBatches(len(shard), batch_size, num_batches, seed=3)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            counts.add(len(batches))
            assert all(batches) and max(len(b) for b in batches) <= batch_size
            seen += [shard[i] for b in batches for i in b]
        assert counts == {num_batches}
        assert sorted(seen) == list(range(split_size))


def test_one_rank_batches_exactly_like_distributed_sampler():
    n, bs, seed = 23, 4, 7
    dataset = list(range(n))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    ours = ShardBatches(n, bs, ShardBatches.per_rank(n, 1, bs), seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        ours.set_epoch(epoch)
        want = [b.tolist() for b in DataLoader(dataset, batch_size=bs, sampler=sampler)]
        assert list(ours) == want


def test_the_same_epoch_gives_the_same_batches_and_another_epoch_others():
    a, b = ShardBatches(30, 4, 8, seed=1), ShardBatches(30, 4, 8, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
