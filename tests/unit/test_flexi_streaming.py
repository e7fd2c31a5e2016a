"""Bounded-memory prepare: events checked, summarised and written batch by batch.

A stream of event batches (P12's parse chunks, a user's events.parquet read in batches, MEDS
output) must give the files of the whole table, byte for byte, while the writer holds no more
than a batch, one stay and a row group."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusemoe.data import flexi
from fusemoe.data.flexi import (
    EventsNotGrouped,
    FlexiModalError,
    validate_dir,
    write_flexi,
)
from fusemoe.data.physionet2012 import read_physionet2012
from fusemoe.data.synthetic import synthesize
from pipelines.prepare import prepare

FILES = ("stays.parquet", "events.parquet", "manifest.json")


@pytest.fixture(scope="module")
def synthetic():
    stays, events, manifest, _ = synthesize(num_stays=1000, seed=3)
    return stays, pa.Table.from_pandas(events, preserve_index=False), manifest


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 100 rows and row groups of 1000, so a few thousand events span many of both."""
    monkeypatch.setattr(flexi, "EVENT_BATCH_ROWS", 100)
    monkeypatch.setattr(flexi, "EVENTS_ROW_GROUP", 1000)


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _batches(table: pa.Table, rows: int):
    for start in range(0, table.num_rows, rows):
        yield from table.slice(start, rows).to_batches()


def test_events_streamed_in_many_batches_give_the_files_of_the_whole_table(
    tmp_path, synthetic, small_batches
):
    stays, events, manifest = synthetic
    write_flexi(tmp_path / "table", stays, events, manifest)
    write_flexi(tmp_path / "stream", stays, _batches(events, 37), manifest)
    _same_files(tmp_path / "table", tmp_path / "stream")
    assert pq.ParquetFile(tmp_path / "stream" / "events.parquet").metadata.num_row_groups == (
        -(-events.num_rows // 1000)
    )


def test_the_writer_holds_a_bounded_number_of_rows_whatever_the_stream_length(
    tmp_path, synthetic, small_batches
):
    """Arrow memory in use when each batch is asked for: it must not grow with the batches
    already consumed (every batch is built from fresh pool allocations)."""
    stays, events, manifest = synthetic
    in_use, streamed = [], []

    def stream():
        for batch in _batches(events, 50):
            in_use.append(pa.total_allocated_bytes())
            fresh = pa.RecordBatch.from_pylist(batch.to_pylist(), schema=batch.schema)
            streamed.append(fresh.nbytes)
            yield fresh

    write_flexi(tmp_path / "ds", stays, stream(), manifest)
    assert len(in_use) > 1000
    grown = max(in_use) - in_use[1]
    # holding every batch would grow by sum(streamed); a batch, a stay and a row group of
    # 1000 rows are a small part of it
    assert grown < sum(streamed) / 4, (grown, sum(streamed))


def test_exact_statistics_do_not_lose_small_values_next_to_large_ones(tmp_path):
    """Mean and std are those of the exact sums, rounded once: float64 sums in order would
    give 2**60 + 1 - 2**60 = 0."""
    stays = pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "v", "t"],
            "split": ["train"] * 3 + ["val", "test"],
            "ihm": np.array([0, 1, 0, 1, 0], np.int8),
        }
    )
    events = pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "v", "t"],
            "modality": ["vitals"] * 5,
            "variable": ["HR"] * 5,
            "time_h": np.zeros(5, np.float32),
            "value": np.array([2.0**60, 1.0, -(2.0**60), 5.0, 5.0], np.float32),
        }
    )
    manifest = {
        "modalities": [{"name": "vitals", "kind": "series", "variables": ["HR"]}],
        "tasks": [{"name": "ihm", "kind": "binary"}],
    }
    norm = write_flexi(tmp_path / "ds", stays, events, manifest)["norm"]["vitals"]["HR"]
    values = [Fraction(2**60), Fraction(1), Fraction(-(2**60))]
    mean = sum(values) / 3
    variance = sum((v - mean) ** 2 for v in values) / 3
    assert norm["count"] == 3
    assert norm["mean"] == float(mean) == 1 / 3
    assert norm["std"] == pytest.approx(float(variance) ** 0.5, rel=1e-15)


def test_an_empty_stream_writes_the_files_of_an_empty_table(tmp_path, synthetic):
    stays, events, manifest = synthetic
    only_static = {
        **manifest,
        "modalities": [m for m in manifest["modalities"] if m["kind"] == "static"],
    }
    stays = stays[stays["Age"].notna()]  # every stay needs an observation: here its static values
    write_flexi(tmp_path / "table", stays, events.schema.empty_table(), only_static)
    write_flexi(tmp_path / "stream", stays, iter([]), only_static)
    _same_files(tmp_path / "table", tmp_path / "stream")


def test_a_repeat_split_across_two_batches_is_found_naming_its_row_in_the_whole_table(
    synthetic, small_batches
):
    stays, events, manifest = synthetic
    # the stay running across the boundary of rows 0..99 and 100..199 gets a repeat at row 100
    stay = events.column("stay_id")[99].as_py()
    first = events.column("stay_id").to_pylist().index(stay)
    rows = list(range(100)) + [first] + list(range(100, events.num_rows))
    bad = events.take(rows)
    assert bad.column("stay_id")[100].as_py() == stay
    with pytest.raises(FlexiModalError) as info:
        flexi.validate(pa.Table.from_pandas(stays), _batches(bad, 100), manifest)
    assert str(info.value).startswith(
        f"events.parquet, row 100, column 'time_h': stay '{stay}' already has a value of"
    )


def test_a_bad_value_in_a_later_batch_is_named_by_its_row_in_the_whole_table(
    tmp_path, synthetic, small_batches
):
    stays, events, manifest = synthetic
    value = events.column("value").to_numpy().copy()
    value[1234] = np.nan
    bad = events.set_column(4, "value", pa.array(value))
    with pytest.raises(FlexiModalError, match=r"^events \(to write\), row 1234, column 'value'"):
        write_flexi(tmp_path / "ds", stays, _batches(bad, 100), manifest)
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left either


def test_a_stream_whose_stay_comes_back_after_another_is_rejected_naming_row_and_stay(
    tmp_path, synthetic
):
    stays, events, manifest = synthetic
    ids = events.column("stay_id").to_pylist()
    second = ids.index(ids[-1])  # the last stay's first row
    order = list(range(second, len(ids))) + list(range(second))
    order.append(order.pop(0))  # the last stay's first row moves to the very end
    with pytest.raises(EventsNotGrouped) as info:
        write_flexi(tmp_path / "ds", stays, _batches(events.take(order), 10_000), manifest)
    assert str(info.value) == (
        f"events (to write), row {len(ids) - 1}, column 'stay_id': events of stay '{ids[-1]}' "
        "resume after other stays' (a stream of event batches must keep each stay's rows "
        "together)"
    )
    assert list(tmp_path.iterdir()) == []


def _flexi_source(tmp_path: Path, synthetic, shuffle: bool) -> Path:
    stays, events, manifest = synthetic
    write_flexi(tmp_path / "src", stays, events, manifest)
    if shuffle:  # a user's file in any row order (several row groups)
        order = np.random.default_rng(0).permutation(events.num_rows)
        table = pq.read_table(tmp_path / "src" / "events.parquet").take(order)
        pq.write_table(table, tmp_path / "src" / "events.parquet", row_group_size=500)
    return tmp_path / "src"


@pytest.mark.parametrize("shuffle", [False, True], ids=["grouped", "any-order"])
def test_flexi_source_is_read_in_batches_and_any_row_order_still_prepares(
    tmp_path, synthetic, small_batches, monkeypatch, shuffle
):
    src = _flexi_source(tmp_path, synthetic, shuffle)
    read = []
    monkeypatch.setattr(flexi, "_record_batches", _spy(flexi._record_batches, read))
    manifest = prepare({"source": "flexi", "flexi_dir": str(src), "out_dir": str(tmp_path / "o")})
    assert read and max(read) <= 100  # the file came in batches of EVENT_BATCH_ROWS
    assert validate_dir(tmp_path / "o") == json.loads((tmp_path / "o/manifest.json").read_text())
    original = json.loads((src / "manifest.json").read_text())
    assert manifest["norm"] == original["norm"]
    assert manifest["missingness"] == original["missingness"]
    assert manifest["counts"] == original["counts"]


def _spy(batches, sizes: list):
    def spied(file, path):
        for batch in batches(file, path):
            sizes.append(batch.num_rows)
            yield batch

    return spied


def test_p12_events_streamed_from_the_spill_give_the_files_of_one_table(tmp_path, small_batches):
    from tests.unit.test_physionet_reader import good_records, make_raw

    raw = make_raw(tmp_path / "raw", good_records(), deaths={100: 1}, los={103: -1}, tar=False)
    stays, table, manifest = read_physionet2012(raw, sets=("a",), verify=False)
    write_flexi(tmp_path / "table", stays, table, manifest)
    (tmp_path / "spill").mkdir()
    stays, events, manifest = read_physionet2012(
        raw, sets=("a",), verify=False, spill_dir=tmp_path / "spill"
    )
    assert not isinstance(events, pa.Table)
    assert len(list((tmp_path / "spill").iterdir())) == 1  # one parse chunk, on disk
    write_flexi(tmp_path / "stream", stays, events, manifest)
    _same_files(tmp_path / "table", tmp_path / "stream")
