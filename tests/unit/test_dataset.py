"""FlexiModalDataset + collate: Batch shapes and masks, presence, train-only normalisation."""

import numpy as np
import pandas as pd
import pytest
import torch

from fusemoe.data.dataset import (
    FlexiModalDataset,
    batch_to,
    collate,
    dataset_spec,
    length_batches,
)
from fusemoe.data.flexi import write_flexi
from fusemoe.data.synthetic import write_synthetic

MANIFEST = {
    "source": "test",
    "modalities": [
        {"name": "vitals", "kind": "series", "variables": ["HR", "Temp"]},
        {"name": "labs", "kind": "series", "variables": ["Na"]},
        {"name": "static", "kind": "static", "variables": ["Age"]},
    ],
    "tasks": [
        {"name": "ihm", "kind": "binary", "column": "ihm", "num_outputs": 1},
        {"name": "los_days", "kind": "regression", "column": "los_days", "num_outputs": 1},
    ],
}


def _tiny(directory):
    """Three train stays, one val, one test; 'b' has no labs, 'e' has a missing los label."""
    stays = pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "d", "e"],
            "split": ["train", "train", "train", "val", "test"],
            "ihm": np.array([0, 1, 0, 1, 0], np.int8),
            "los_days": pd.array([3.0, 9.0, 4.0, 2.0, None], "Float32"),
            "Age": pd.array([50.0, 70.0, None, 60.0, 1000.0], "Float32"),
        }
    )
    rows = [  # stay, modality, variable, time, value
        ("a", "vitals", "HR", 1.0, 10.0),
        ("a", "vitals", "Temp", 1.0, 37.0),
        ("a", "vitals", "HR", 2.5, 20.0),
        ("a", "labs", "Na", 0.5, 140.0),
        ("b", "vitals", "Temp", 4.0, 38.0),
        ("c", "vitals", "HR", 0.0, 15.0),
        ("c", "labs", "Na", 3.0, 130.0),
        ("d", "vitals", "HR", 1.0, 100.0),
        ("e", "vitals", "HR", 2.0, 1000.0),
        ("e", "labs", "Na", 1.0, 135.0),
    ]
    events = pd.DataFrame(rows, columns=["stay_id", "modality", "variable", "time_h", "value"])
    events = events.astype({"time_h": np.float32, "value": np.float32})
    return write_flexi(directory, stays, events, MANIFEST)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    _tiny(d / "flexi")
    return d / "flexi"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn") / "flexi"
    write_synthetic(d, num_stays=300, seed=0)
    return d


def test_observations_at_the_same_time_share_one_time_row(tiny):
    ds = FlexiModalDataset(tiny, "train")
    a = ds[ds.stay_ids.index("a")]["series"]["vitals"]
    np.testing.assert_array_equal(a["times"], [1.0, 2.5])
    np.testing.assert_array_equal(a["mask"], [[1, 1], [1, 0]])


def test_collate_pads_to_longest_modality_with_zero_mask_and_zero_times(tiny):
    ds = FlexiModalDataset(tiny, "train")
    batch = collate([ds[i] for i in range(len(ds))])
    v = batch["series"]["vitals"]
    assert v["values"].shape == (3, 2, 2) and v["mask"].shape == (3, 2, 2)
    assert v["times"].shape == (3, 2)
    b = ds.stay_ids.index("b")
    assert (
        v["mask"][b, 1].sum() == 0 and v["times"][b, 1] == 0 and v["values"][b, 1].abs().sum() == 0
    )
    assert v["values"].dtype == torch.float32 and batch["present"]["vitals"].dtype == torch.bool
    assert batch["stay_id"] == ds.stay_ids


def test_missing_modality_gives_present_false_and_a_single_fully_masked_row(tiny):
    ds = FlexiModalDataset(tiny, "train")
    b = ds[ds.stay_ids.index("b")]
    batch = collate([b])
    labs = batch["series"]["labs"]
    assert labs["values"].shape == (1, 1, 1)
    assert labs["mask"].sum() == 0
    assert batch["present"] == {
        "vitals": torch.tensor([True]),
        "labs": torch.tensor([False]),
        "static": torch.tensor([True]),
    }


def test_values_are_z_scored_with_train_statistics_only(tiny):
    manifest = FlexiModalDataset(tiny, "test").manifest
    hr = manifest["norm"]["vitals"]["HR"]  # train HR values 10, 20, 15
    assert hr["mean"] == pytest.approx(15.0) and hr["count"] == 3
    assert hr["std"] == pytest.approx(np.std([10.0, 20.0, 15.0]))
    test = collate([FlexiModalDataset(tiny, "test")[0]])
    expected = (1000.0 - 15.0) / np.std([10.0, 20.0, 15.0])
    assert test["series"]["vitals"]["values"][0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    age = manifest["norm"]["static"]["Age"]  # train ages 50, 70 (third is null)
    assert age["mean"] == pytest.approx(60.0) and age["count"] == 2


def test_missing_static_value_and_missing_label_are_masked_and_nan(tiny):
    train = FlexiModalDataset(tiny, "train")
    batch = collate([train[train.stay_ids.index("c")]])
    assert batch["static"]["mask"].tolist() == [[0.0]] and batch["static"]["values"].tolist() == [
        [0.0]
    ]
    test = collate([FlexiModalDataset(tiny, "test")[0]])
    assert torch.isnan(test["labels"]["los_days"]).all()
    assert test["labels"]["ihm"].tolist() == [0.0]


def test_collate_shapes_on_synthetic_batch(syn):
    ds = FlexiModalDataset(syn, "val")
    samples = [ds[i] for i in range(16)]
    batch = collate(samples)
    spec = dataset_spec(ds.manifest)
    for name, width in spec.series.items():
        longest = max(s["series"][name]["times"].shape[0] for s in samples)
        assert batch["series"][name]["values"].shape == (16, max(1, longest), width)
        lengths = torch.tensor([s["series"][name]["times"].shape[0] for s in samples])
        assert torch.equal(batch["present"][name], lengths > 0)
        # every real time row has at least one observed variable
        rows_real = torch.arange(batch["series"][name]["mask"].shape[1])[None] < lengths[:, None]
        assert torch.equal(batch["series"][name]["mask"].sum(-1) > 0, rows_real)
    assert batch["static"]["values"].shape == (16, spec.static_dim)
    assert set(batch["labels"]) == {"ihm", "los_gt7", "los_days", "acuity", "phenotype"}
    assert batch["labels"]["acuity"].shape == (16,) and batch["labels"]["phenotype"].shape == (
        16,
        3,
    )


def test_dataset_is_deterministic_across_instances(syn):
    one = collate([FlexiModalDataset(syn, "train")[i] for i in range(8)])
    two = collate([FlexiModalDataset(syn, "train")[i] for i in range(8)])
    for name in one["series"]:
        for key in ("values", "mask", "times"):
            assert torch.equal(one["series"][name][key], two["series"][name][key])
    assert one["stay_id"] == two["stay_id"]


def test_split_sizes_tasks_subset_and_max_stays(syn):
    sizes = {s: len(FlexiModalDataset(syn, s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 300 and sizes["train"] == 210
    small = FlexiModalDataset(syn, "train", tasks=["ihm"], max_stays=5)
    assert len(small) == 5 and set(small[0]["labels"]) == {"ihm"}
    with pytest.raises(ValueError, match="unknown task"):
        FlexiModalDataset(syn, "train", tasks=["nope"])


def test_dataset_spec_lists_series_widths_static_dim_and_tasks(syn):
    spec = dataset_spec(FlexiModalDataset(syn, "val").manifest)
    assert spec.series == {"vitals": 4, "labs": 5, "respiratory": 3}
    assert spec.static_dim == 3 and spec.static_name == "static"
    assert [(t.name, t.kind, t.num_outputs) for t in spec.tasks] == [
        ("ihm", "binary", 1),
        ("los_gt7", "binary", 1),
        ("los_days", "regression", 1),
        ("acuity", "multiclass", 4),
        ("phenotype", "multilabel", 3),
    ]


def test_batch_to_moves_every_tensor_and_keeps_stay_ids(syn):
    ds = FlexiModalDataset(syn, "val")
    moved = batch_to(collate([ds[0], ds[1]]), "meta")
    assert moved["series"]["labs"]["values"].device.type == "meta"
    assert moved["present"]["static"].device.type == "meta"
    assert moved["labels"]["ihm"].device.type == "meta"
    assert moved["stay_id"] == ds.stay_ids[:2]


def test_from_tables_scores_records_like_the_directory_and_rejects_unknown_variables(tiny):
    import pyarrow as pa

    from fusemoe.data.flexi import FlexiModalError

    manifest = FlexiModalDataset(tiny, "test").manifest
    stays = pa.table({"stay_id": ["e"], "Age": pa.array([1000.0], pa.float32())})
    events = pd.read_parquet(tiny / "events.parquet")
    events = events[events["stay_id"] == "e"].astype({"modality": str, "variable": str})
    events = pa.Table.from_pandas(events, preserve_index=False)
    scored = collate([FlexiModalDataset.from_tables(stays, events, manifest)[0]])
    stored = collate([FlexiModalDataset(tiny, "test")[0]])
    for name in stored["series"]:
        assert torch.equal(scored["series"][name]["values"], stored["series"][name]["values"])
    assert torch.isnan(scored["labels"]["ihm"]).all()
    bad = events.set_column(2, "variable", pa.array(["Pulse"] * events.num_rows))
    with pytest.raises(
        FlexiModalError, match=r"records, row 0, column 'variable': unknown variable 'Pulse'"
    ):
        FlexiModalDataset.from_tables(stays, bad, manifest)


def test_modality_dropout_only_clears_present_flags_and_is_seeded(syn):
    from fusemoe.data.dataset import drop_modalities

    batch = collate([FlexiModalDataset(syn, "train")[i] for i in range(64)])
    assert drop_modalities(batch, 0.0) is batch
    a = drop_modalities(batch, 0.5, torch.Generator().manual_seed(0))
    b = drop_modalities(batch, 0.5, torch.Generator().manual_seed(0))
    for m, flags in batch["present"].items():
        assert torch.equal(a["present"][m], b["present"][m])
        assert not (a["present"][m] & ~flags).any()  # a missing modality never comes back
    kept = sum(int(a["present"][m].sum()) for m in batch["present"])
    total = sum(int(f.sum()) for f in batch["present"].values())
    assert 0.3 * total < kept < 0.7 * total
    assert a["series"] is batch["series"] and a["labels"] is batch["labels"]


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["stay_id"] == b["stay_id"]
    for key in a.keys() - {"stay_id"}:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("indices", [[0, 1, 2], [2, 0], [1], [1, 1, 0]])
def test_batch_gathers_exactly_the_collate_of_the_samples(tiny, indices):
    ds = FlexiModalDataset(tiny, "train")  # stay 'b' has no labs: one empty modality
    assert_batches_equal(ds.batch(indices), collate([ds[i] for i in indices]))


def test_batch_of_a_synthetic_split_matches_collate_in_any_order(syn):
    ds = FlexiModalDataset(syn, "train")
    indices = np.random.default_rng(0).permutation(len(ds))[:37].tolist()
    assert_batches_equal(ds.batch(indices), collate([ds[i] for i in indices]))


def test_num_rows_counts_each_stays_time_rows_over_all_series(tiny):
    ds = FlexiModalDataset(tiny, "train")  # a: 2 vitals rows + 1 labs row, b: 1, c: 1 + 1
    assert ds.num_rows().tolist() == [3, 1, 2]


def test_length_batches_group_stays_by_length_and_cover_each_once():
    batches = length_batches(np.array([5, 1, 4, 1, 3]), 2)
    assert batches == [[1, 3], [4, 2], [0]]
