"""Strict FlexiModal validation: every bad input is a one-line error naming file, row, column."""

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusemoe.data.flexi import (
    FlexiModalError,
    assign_splits,
    load_manifest,
    validate,
    validate_dir,
    write_flexi,
)

MANIFEST = {
    "source": "test",
    "modalities": [
        {"name": "vitals", "kind": "series", "variables": ["HR", "Temp"]},
        {"name": "static", "kind": "static", "variables": ["Age"]},
    ],
    "tasks": [
        {"name": "ihm", "kind": "binary", "column": "ihm", "num_outputs": 1},
        {"name": "los_days", "kind": "regression", "column": "los_days", "num_outputs": 1},
    ],
}


def _stays(**override) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "d"],
            "split": ["train", "train", "val", "test"],
            "ihm": np.array([0, 1, 0, 1], np.int8),
            "los_days": pd.array([3.0, None, 4.0, 8.0], "Float32"),
            "Age": pd.array([50.0, 60.0, None, 70.0], "Float32"),
        }
    )
    for k, v in override.items():
        df[k] = v
    return df


def _events(**override) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "stay_id": ["a", "a", "b", "c", "d"],
            "modality": pd.Categorical(["vitals"] * 5),
            "variable": pd.Categorical(["HR", "Temp", "HR", "HR", "Temp"]),
            "time_h": np.array([0.0, 0.5, 1.0, 2.0, 3.0], np.float32),
            "value": np.array([80, 37, 90, 70, 38], np.float32),
        }
    )
    for k, v in override.items():
        df[k] = v
    return df


def _table(df: pd.DataFrame) -> pa.Table:
    """Like from_pandas, but numpy float columns keep NaN as NaN (from_pandas makes it null)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    for i, name in enumerate(df.columns):
        if isinstance(df[name].dtype, np.dtype) and df[name].dtype.kind == "f":
            table = table.set_column(i, name, pa.array(df[name].to_numpy()))
    return table


def _check(stays: pd.DataFrame, events: pd.DataFrame, manifest: dict = MANIFEST) -> None:
    validate(_table(stays), _table(events), json.loads(json.dumps(manifest)))


def _error(stays, events, manifest=MANIFEST) -> str:
    with pytest.raises(FlexiModalError) as info:
        _check(stays, events, manifest)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_valid_tables_pass():
    _check(_stays(), _events())


def test_duplicate_stay_id_is_rejected_with_row_number():
    msg = _error(_stays(stay_id=["a", "b", "c", "a"]), _events())
    assert msg == "stays.parquet, row 3, column 'stay_id': duplicate stay_id 'a' (first at row 0)"


def test_unknown_stays_column_is_rejected_naming_the_column():
    msg = _error(_stays(extra=[1, 2, 3, 4]), _events())
    assert msg.startswith("stays.parquet, column 'extra': unknown column")


def test_missing_label_column_is_rejected():
    assert "column 'ihm': required column is missing" in _error(
        _stays().drop(columns="ihm"), _events()
    )


def test_wrong_column_type_is_rejected_with_expected_type():
    msg = _error(_stays(), _events(value=np.array([80, 37, 90, 70, 38], np.float64)))
    assert msg == "events.parquet, column 'value': wrong type double, expected float"


def test_nan_value_is_rejected_with_row_number():
    msg = _error(_stays(), _events(value=np.array([80, 37, np.nan, 70, 38], np.float32)))
    assert msg == "events.parquet, row 2, column 'value': value is not finite (nan)"


def test_infinite_time_is_rejected_with_row_number():
    msg = _error(_stays(), _events(time_h=np.array([0, np.inf, 1, 2, 3], np.float32)))
    assert msg == "events.parquet, row 1, column 'time_h': time is not finite (inf)"


def test_negative_time_is_rejected_with_row_number():
    msg = _error(_stays(), _events(time_h=np.array([0, 1, 1, -2, 3], np.float32)))
    assert msg == "events.parquet, row 3, column 'time_h': negative time -2.0 h"


def test_binary_label_outside_its_domain_is_rejected_with_row_number():
    msg = _error(_stays(ihm=np.array([0, 1, 2, 1], np.int8)), _events())
    assert msg == (
        "stays.parquet, row 2, column 'ihm': label 2 of task 'ihm' is outside its domain 0..1"
    )


def test_regression_label_nan_instead_of_null_is_rejected():
    msg = _error(_stays(los_days=np.array([1, np.nan, 2, 3], np.float32)), _events())
    assert "row 1, column 'los_days': regression label (use null for missing) is not finite" in msg


def test_empty_split_is_rejected():
    msg = _error(_stays(split=["train", "train", "test", "test"]), _events())
    assert msg == "stays.parquet, column 'split': split 'val' is empty (no stays)"


def test_unknown_split_name_is_rejected_with_row_number():
    msg = _error(_stays(split=["train", "valid", "val", "test"]), _events())
    assert "row 1, column 'split': split 'valid' is not one of" in msg


def test_unknown_variable_for_the_modality_is_rejected_with_row_number():
    msg = _error(_stays(), _events(variable=pd.Categorical(["HR", "Temp", "HR", "Pulse", "HR"])))
    assert msg == (
        "events.parquet, row 3, column 'variable': unknown variable 'Pulse' for modality 'vitals'"
        " (not in the manifest)"
    )


def test_unknown_modality_is_rejected_with_row_number():
    msg = _error(_stays(), _events(modality=pd.Categorical(["vitals"] * 4 + ["notes"])))
    assert "row 4, column 'modality': modality 'notes' is not a series modality" in msg


def test_event_of_an_unknown_stay_is_rejected():
    msg = _error(_stays(), _events(stay_id=["a", "a", "b", "zz", "d"]))
    assert msg == "events.parquet, row 3, column 'stay_id': stay_id 'zz' is not in stays.parquet"


def test_stay_with_no_observations_at_all_is_rejected():
    stays = _stays(Age=pd.array([50.0, 60.0, None, None], "Float32"))
    events = _events().iloc[:4]
    msg = _error(stays, events)
    assert (
        msg
        == "stays.parquet, row 3: stay 'd' has no observations at all (no events, no static values)"
    )


def test_stay_with_static_values_but_no_events_is_kept():
    _check(_stays(), _events().iloc[:4])


def test_null_event_value_is_rejected_with_row_number():
    events = _table(_events())
    events = events.set_column(4, "value", pa.array([80, None, 90, 70, 38], pa.float32()))
    with pytest.raises(FlexiModalError) as info:
        validate(_table(_stays()), events, MANIFEST)
    assert str(info.value) == "events.parquet, row 1, column 'value': missing (null) value"


def test_static_nan_instead_of_null_is_rejected():
    msg = _error(_stays(Age=np.array([1, 2, np.nan, 3], np.float32)), _events())
    assert "row 2, column 'Age'" in msg


def test_manifest_without_tasks_is_rejected():
    bad = {k: v for k, v in MANIFEST.items() if k != "tasks"}
    assert "'tasks' must be a non-empty list" in _error(_stays(), _events(), bad)


def test_parquet_file_with_wrong_column_type_is_rejected_naming_the_file(tmp_path):
    write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)
    events = pq.read_table(tmp_path / "ds" / "events.parquet")
    events = events.set_column(3, "time_h", events.column("time_h").cast(pa.string()))
    pq.write_table(events, tmp_path / "ds" / "events.parquet")
    with pytest.raises(FlexiModalError) as info:
        validate_dir(tmp_path / "ds")
    assert str(info.value) == (
        f"{tmp_path / 'ds' / 'events.parquet'}, column 'time_h': wrong type string, expected float"
    )


def test_written_directory_round_trips_through_validate_dir(tmp_path):
    manifest = write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)
    assert load_manifest(tmp_path / "ds") == manifest
    assert validate_dir(tmp_path / "ds")["counts"]["stays"] == 4
    assert manifest["norm"]["vitals"]["HR"]["mean"] == pytest.approx(85.0)  # train stays a, b only
    assert manifest["missingness"]["modality"]["vitals"]["all"] == 0.0


def test_failed_write_leaves_no_partial_output_and_keeps_the_old_directory(tmp_path):
    with pytest.raises(FlexiModalError):
        write_flexi(tmp_path / "new", _stays(stay_id=["a", "a", "c", "d"]), _events(), MANIFEST)
    assert list(tmp_path.iterdir()) == []
    write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)
    before = (tmp_path / "ds" / "manifest.json").read_text()
    with pytest.raises(FlexiModalError):
        write_flexi(
            tmp_path / "ds", _stays(), _events(value=np.full(5, np.inf, np.float32)), MANIFEST
        )
    assert (tmp_path / "ds" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_successful_write_replaces_an_existing_directory(tmp_path):
    write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)
    (tmp_path / "ds" / "stale.txt").write_text("old")
    write_flexi(tmp_path / "ds", _stays(), _events().iloc[:4], MANIFEST)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "events.parquet",
        "manifest.json",
        "stays.parquet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_assign_splits_is_stratified_seeded_and_follows_fractions():
    df = pd.DataFrame({"y": [1] * 200 + [0] * 800})
    a = assign_splits(df, (0.8, 0.1, 0.1), seed=0, stratify_col="y")
    assert np.array_equal(a, assign_splits(df, (0.8, 0.1, 0.1), seed=0, stratify_col="y"))
    assert not np.array_equal(a, assign_splits(df, (0.8, 0.1, 0.1), seed=1, stratify_col="y"))
    counts = pd.Series(a).value_counts().to_dict()
    assert counts == {"train": 800, "val": 100, "test": 100}
    for split in ("train", "val", "test"):
        assert df["y"][a == split].mean() == pytest.approx(0.2)


def test_assign_splits_rejects_fractions_not_summing_to_one():
    with pytest.raises(ValueError, match=re.escape("sum")):
        assign_splits(pd.DataFrame({"y": [0, 1]}), (0.5, 0.2, 0.2), seed=0)


# ----------------------------------------------------------------------------- lossless casts


def _pandas_defaults() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables as users' pandas code makes them: int64 labels, float64 everything else."""
    stays = _stays(
        ihm=np.array([0, 1, 0, 1], np.int64),
        los_days=np.array([3.0, np.nan, 4.0, 8.1]),
        Age=np.array([50.5, 60.0, np.nan, 70.0]),
    )
    events = _events(
        time_h=np.array([0.0, 0.5, 1.1, 2.0, 3.0]), value=np.array([80, 37.2, 90, 70, 38])
    )
    return stays, events


def test_int64_labels_and_float64_values_are_cast_losslessly_and_recorded(tmp_path):
    stays, events = _pandas_defaults()
    manifest = write_flexi(tmp_path / "ds", stays, events, MANIFEST)
    assert manifest["casts"] == {
        "stays.parquet": {
            "ihm": "int64 -> int8",
            "los_days": "double -> float",
            "Age": "double -> float",
        },
        "events.parquet": {"time_h": "double -> float", "value": "double -> float"},
    }
    written = pq.read_table(tmp_path / "ds" / "events.parquet")
    assert written.schema.field("value").type == pa.float32()
    np.testing.assert_array_equal(
        written.column("value").to_numpy(), events["value"].astype(np.float32)
    )
    assert pq.read_table(tmp_path / "ds" / "stays.parquet").column("los_days").null_count == 1


def test_exactly_typed_tables_record_no_casts(tmp_path):
    assert "casts" not in write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)


def test_multilabel_int64_lists_are_cast_to_int8_lists(tmp_path):
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["tasks"].append({"name": "ph", "kind": "multilabel", "num_outputs": 2})
    stays = _stays()
    stays["ph"] = [[0, 1], None, [1, 1], [0, 0]]  # pandas: lists of Python ints (int64)
    out = write_flexi(tmp_path / "ds", stays, _events(), manifest)
    assert out["casts"]["stays.parquet"] == {"ph": "list<item: int64> -> list<item: int8>"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"stays": {"ihm": np.array([0, 1, 300, 1], np.int64)}},
            "stays (to write), row 2, column 'ihm': value 300 does not fit int8 without loss",
        ),
        (
            {"stays": {"ihm": np.array([0, 1, 0.5, 1])}},
            "stays (to write), row 2, column 'ihm': value 0.5 does not fit int8 without loss",
        ),
        (
            {"events": {"value": np.array([80, 37, 1e39, 70, 38])}},
            "events (to write), row 2, column 'value': value 1e+39 does not fit float without loss",
        ),
        (
            {"events": {"time_h": np.array([0, 1e-40, 1, 2, 3])}},
            "events (to write), row 1, column 'time_h': value 1e-40 does not fit float without loss",
        ),
    ],
)
def test_lossy_casts_are_rejected_naming_row_column_and_value(tmp_path, override, expected):
    stays, events = _pandas_defaults()
    for k, v in override.get("stays", {}).items():
        stays[k] = v
    for k, v in override.get("events", {}).items():
        events[k] = v
    with pytest.raises(FlexiModalError) as info:
        write_flexi(tmp_path / "ds", stays, events, MANIFEST)
    assert str(info.value).startswith(expected), str(info.value)
    assert not (tmp_path / "ds").exists()


def test_binary_label_2_in_an_int64_column_is_rejected_by_its_domain(tmp_path):
    stays, events = _pandas_defaults()
    stays["ihm"] = np.array([0, 2, 0, 1], np.int64)
    with pytest.raises(
        FlexiModalError, match="row 1, column 'ihm': label 2 of task 'ihm' is outside"
    ):
        write_flexi(tmp_path / "ds", stays, events, MANIFEST)


def test_prepare_accepts_a_users_pandas_parquet_files_and_says_so_in_the_manifest(tmp_path):
    from pipelines.prepare import prepare

    src = tmp_path / "mine"
    src.mkdir()
    stays, events = _pandas_defaults()
    stays.to_parquet(src / "stays.parquet")
    events.astype({"modality": str, "variable": str}).to_parquet(src / "events.parquet")
    (src / "manifest.json").write_text(json.dumps(MANIFEST))
    manifest = prepare({"source": "flexi", "flexi_dir": str(src), "out_dir": str(tmp_path / "out")})
    assert manifest["casts"]["stays.parquet"]["ihm"] == "int64 -> int8"
    assert manifest["casts"]["events.parquet"]["time_h"] == "double -> float"


def test_two_values_of_one_variable_at_the_same_time_are_rejected():
    events = _events(time_h=np.array([0.0, 0.5, 1.0, 2.0, 3.0], np.float32))
    events = pd.concat([events, events.iloc[[2]].assign(value=np.float32(95))], ignore_index=True)
    msg = _error(_stays(), events)
    assert msg == (
        "events.parquet, row 5, column 'time_h': stay 'b' already has a value of vitals 'HR' at"
        " 1.0 h (one value per variable and time; average or drop repeats)"
    )


def test_same_time_different_variables_or_stays_are_not_repeats():
    events = _events(time_h=np.array([1.0, 1.0, 1.0, 1.0, 1.0], np.float32))
    _check(_stays(), events)
