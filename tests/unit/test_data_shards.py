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


def padded_size(batches: list[list[int]], lengths: np.ndarray) -> int:
    return sum(len(b) * int(lengths[b].max()) for b in batches)


@pytest.mark.parametrize(("split_size", "world"), [(300, 1), (301, 2), (50, 3)])
def test_length_bucketed_batches_cover_each_shard_once_and_pad_less(split_size, world):
    lengths = np.random.default_rng(0).integers(1, 200, split_size)
    bs = 8
    num_batches = ShardBatches.per_rank(split_size, world, bs)
    for epoch in range(2):
        seen, padded, random_padded = [], 0, 0
        for rank in range(world):
            shard = np.arange(split_size)[rank::world]
            ours = ShardBatches(len(shard), bs, num_batches, seed=3, lengths=lengths[shard])
            plain = ShardBatches(len(shard), bs, num_batches, seed=3)
            ours.set_epoch(epoch), plain.set_epoch(epoch)
            batches = list(ours)
            assert len(batches) == num_batches and max(len(b) for b in batches) <= bs
            seen += [int(shard[i]) for b in batches for i in b]
            padded += padded_size(batches, lengths[shard])
            random_padded += padded_size(list(plain), lengths[shard])
        assert sorted(seen) == list(range(split_size))
        assert padded < 0.8 * random_padded


def test_length_bucketed_batches_are_seeded_by_epoch_and_mix_lengths_across_the_epoch():
    lengths = np.random.default_rng(1).integers(1, 100, 2000)
    a = ShardBatches(2000, 16, 125, seed=1, lengths=lengths)
    b = ShardBatches(2000, 16, 125, seed=1, lengths=lengths)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    # Batches come in random order, not shortest first.
    longest = [int(lengths[batch].max()) for batch in a]
    assert longest != sorted(longest)


def test_length_bucketed_ranks_run_batches_of_similar_length_at_each_step():
    """A data-parallel step waits for its slowest rank, so the ranks' k-th batches should pad to
    about the same length, also when the shards differ in size (here 2001 and 2000 stays), where
    shuffles drawn from each shard's own permutation would pair long with short."""
    lengths = np.random.default_rng(2).integers(1, 300, 4001)
    world, bs = 2, 16
    num_batches = ShardBatches.per_rank(len(lengths), world, bs)
    longest = []
    for rank in range(world):
        shard = np.arange(len(lengths))[rank::world]
        sampler = ShardBatches(len(shard), bs, num_batches, seed=5, lengths=lengths[shard])
        sampler.set_epoch(1)
        longest.append(np.array([lengths[shard][b].max() for b in sampler]))
    gap = np.abs(longest[0] - longest[1]).mean()
    unpaired = np.abs(longest[0] - np.random.default_rng(0).permutation(longest[1])).mean()
    assert gap < 0.1 * unpaired
    assert not np.array_equal(longest[0], np.sort(longest[0]))  # still in random order


@pytest.mark.parametrize("bucketed", [False, True])
def test_ranks_shuffle_their_shards_with_their_own_streams(bucketed):
    """Shards are every world-th stay, so with one shared stream equal shards get the same
    permutation and stays 2k and 2k + 1 would share a step in every epoch."""
    n, world, bs = 800, 2, 16
    lengths = np.random.default_rng(3).integers(1, 100, n) if bucketed else None
    num_batches = ShardBatches.per_rank(n, world, bs)
    same_step = []
    for epoch in range(3):
        steps = []
        for rank in range(world):
            shard = None if lengths is None else lengths[rank::world]
            sampler = ShardBatches(n // world, bs, num_batches, 7, shard, rank=rank)
            sampler.set_epoch(epoch)
            step_of = np.empty(n // world, dtype=int)
            for step, batch in enumerate(sampler):
                step_of[batch] = step
            steps.append(step_of)
        same_step.append(np.mean(steps[0] == steps[1]))  # local stay i of both ranks
    assert max(same_step) < 0.2  # about 1 / num_batches by chance, not 1


def test_lengths_must_match_the_shard():
    with pytest.raises(ValueError, match="3 lengths for a shard of 4 stays"):
        ShardBatches(4, 2, 2, seed=0, lengths=np.ones(3))


def test_a_rank_with_more_ranks_than_validation_stays_gets_an_empty_shard(data_dir):
    # Validation is split over the ranks; with more ranks than stays some shards are empty.
    val = FlexiModalDataset(data_dir, "val")
    world = len(val) + 1
    empty = FlexiModalDataset(data_dir, "val", shard=(world - 1, world))
    assert len(empty) == 0 and empty.split_size == len(val)
