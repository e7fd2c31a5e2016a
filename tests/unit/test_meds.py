"""MEDS input (data.source: meds): stays per prediction time, the window, static codes, splits,
multilabel labels, MEDS prediction output, and every bad input as a one-line error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusemoe.data.flexi import FlexiModalError
from fusemoe.data.meds import (
    DATA_SCHEMA,
    LABEL_SCHEMA,
    PREDICTION_SCHEMA,
    meds_predictions,
    read_meds,
    stay_id_to_meds,
    write_synthetic_meds,
)
from pipelines import config
from pipelines.prepare import prepare

REPO = Path(__file__).parents[2]
T0 = datetime(2020, 1, 1)
SPLITS = {1: "train", 2: "train", 3: "tuning", 4: "tuning", 5: "held_out", 6: "held_out"}


def h(hours: float | None) -> datetime | None:
    return None if hours is None else T0 + timedelta(hours=hours)


def subject_events(s: int) -> list[tuple]:
    """Per subject, prediction time h(48), window [h(0), h(48)]."""
    rows = [
        (s, h(-5), "LAB//A", 1.0),  # before the window: dropped
        (s, h(1), "LAB//A", 2.0),
        (s, h(10), "LAB//A", 4.0),
        (s, h(10), "LAB//A", 6.0),  # a repeat at one time: averaged with the one above
        (s, h(20), "VITAL//HR", 80.0 + s),
        (s, h(30), "LAB//B", None),  # no numeric_value: skipped
        (s, h(48), "VITAL//HR", 90.0),  # at the prediction time: kept
        (s, h(60), "LAB//A", 9.0),  # after the prediction time: dropped
        (s, h(0), "STATIC//WEIGHT", 70.0),
        (s, h(40), "STATIC//WEIGHT", 72.0),  # the latest before prediction time wins
        (s, h(50), "STATIC//WEIGHT", 99.0),  # after: ignored
        (s, h(5), "MEDS_BIRTH", None),  # no modality: counted
    ]
    if s % 2:
        rows.insert(0, (s, None, "GENDER//F", None))  # null time: a static indicator
    return rows


def write_events(file: Path, rows: list[tuple], schema: pa.Schema = DATA_SCHEMA) -> None:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 4
    table = {n: list(c) for n, c in zip(DATA_SCHEMA.names[:4], cols, strict=True)}
    table["text_value"] = [None] * len(rows)
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({n: table[n] for n in schema.names}, schema=schema), file)


def write_labels(file: Path, rows: list[dict]) -> None:
    cols = {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in LABEL_SCHEMA}
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=LABEL_SCHEMA), file)


def write_splits(file: Path, splits: dict[int, str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {"subject_id": pa.array(list(splits), pa.int64()), "split": list(splits.values())}
        ),
        file,
    )


@pytest.fixture
def meds(tmp_path) -> Path:
    """Six subjects in two shards, subject splits, a binary label per subject at h(48)."""
    root = tmp_path / "meds"
    write_events(root / "data" / "0.parquet", [r for s in (1, 2, 3) for r in subject_events(s)])
    write_events(root / "data" / "1.parquet", [r for s in (4, 5, 6) for r in subject_events(s)])
    write_splits(root / "metadata" / "subject_splits.parquet", SPLITS)
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "tiny"}))
    labels = [
        {"subject_id": s, "prediction_time": h(48), "boolean_value": s % 3 == 0} for s in SPLITS
    ]
    write_labels(tmp_path / "labels.parquet", labels)
    return root


def cfg_of(root: Path, **over) -> dict:
    meds = {"dataset_dir": str(root), "labels": str(root.parent / "labels.parquet"), **over}
    return config.validate({"data": {"source": "meds", "meds": meds}})["data"]["meds"]


def rejected(root: Path, **over) -> str:
    """prepare's one-line error for the MEDS dataset at `root`; asserts nothing was written."""
    out = root.parent / "processed"
    data = config.validate(
        {
            "data": {
                "source": "meds",
                "out_dir": str(out),
                "meds": {
                    "dataset_dir": str(root),
                    "labels": str(root.parent / "labels.parquet"),
                    **over,
                },
            }
        }
    )["data"]
    with pytest.raises(FlexiModalError) as e:
        prepare(data)
    assert not out.exists() and "\n" not in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- conversion


def test_each_labelled_prediction_time_becomes_one_stay_with_its_subject_and_split(meds):
    stays, _, manifest = read_meds(cfg_of(meds))
    assert stays["stay_id"].tolist() == [f"{s}@2020-01-03T00:00:00" for s in SPLITS]
    assert stays["subject_id"].tolist() == [str(s) for s in SPLITS]
    assert stays["split"].tolist() == ["train", "train", "val", "val", "test", "test"]
    assert stays["outcome"].tolist() == [0, 0, 1, 0, 0, 1]
    assert manifest["tasks"] == [{"name": "outcome", "kind": "binary", "num_outputs": 1}]
    assert stay_id_to_meds(stays["stay_id"][0]) == (1, h(48))


def test_window_keeps_events_up_to_prediction_time_in_hours_from_its_start(meds):
    _, events, manifest = read_meds(cfg_of(meds))
    ev = events.to_pandas()
    one = ev[ev["stay_id"] == "1@2020-01-03T00:00:00"]
    got = sorted(zip(one["variable"].astype(str), one["time_h"], one["value"], strict=True))
    assert got == [("LAB//A", 1.0, 2.0), ("LAB//A", 10.0, 5.0), ("VITAL//HR", 20.0, 81.0),
                   ("VITAL//HR", 48.0, 90.0)]  # fmt: skip
    counts = manifest["meds"]["counts"]
    assert counts["null_numeric_value"] == 6 and counts["outside_window"] == 12
    assert counts["unmatched_codes"] == {"MEDS_BIRTH": 6}
    mods = {m["name"]: m["variables"] for m in manifest["modalities"]}
    assert mods == {
        "labs": ["LAB//A"],
        "vitals": ["VITAL//HR"],
        "static": ["GENDER//F", "STATIC//WEIGHT"],
    }


def test_static_codes_take_the_latest_value_and_untimed_indicators_are_zero_or_one(meds):
    stays, _, _ = read_meds(cfg_of(meds))
    assert stays["STATIC//WEIGHT"].tolist() == [72.0] * 6
    assert stays["GENDER//F"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_a_shorter_window_drops_earlier_events(meds):
    _, events, _ = read_meds(cfg_of(meds, window_h=30))
    times = events.column("time_h").to_numpy()
    assert times.min() == 2.0 and times.max() == 30.0  # h(20) and h(48) in a window from h(18)


def test_meds_prepare_writes_a_validated_flexi_directory_with_subject_ids(meds, tmp_path):
    data = config.validate(
        {"data": {"source": "meds", "out_dir": str(tmp_path / "out"), "meds": cfg_of(meds)}}
    )["data"]
    manifest = prepare(data)
    stays = pq.read_table(tmp_path / "out" / "stays.parquet")
    assert stays.column("subject_id").to_pylist() == [str(s) for s in SPLITS]
    assert manifest["source"].startswith("meds:") and manifest["counts"]["stays"] == 6
    assert manifest["meds"]["dataset"] == {"dataset_name": "tiny"}


def test_without_subject_splits_subjects_are_split_by_subject(tmp_path):
    root = tmp_path / "meds"
    write_synthetic_meds(root, tmp_path / "labels.parquet", num_subjects=80, events_per_subject=20)
    (root / "metadata" / "subject_splits.parquet").unlink()
    stays, _, manifest = read_meds(cfg_of(root))
    per_subject = stays.groupby("subject_id")["split"].nunique()
    assert (stays.groupby("subject_id").size() > 1).any()  # subjects with two prediction times
    assert (per_subject == 1).all()
    assert manifest["split"]["grouped_by"] == "subject_id"


def test_25_multilabel_phenotypes_become_one_multilabel_task(tmp_path):
    root = tmp_path / "meds"
    write_synthetic_meds(root, tmp_path / "labels.parquet", num_subjects=60, num_labels=25)
    stays, _, manifest = read_meds(cfg_of(root, task="pheno", task_kind="multilabel"))
    task = manifest["tasks"][0]
    assert task["kind"] == "multilabel" and task["num_outputs"] == 25
    assert task["labels"] == [f"PHENO//{k:02d}" for k in range(25)]
    assert all(len(v) == 25 and set(v) <= {0, 1} for v in stays["pheno"])
    labels = pq.read_table(tmp_path / "labels.parquet").to_pandas()
    first = labels[labels["subject_id"] == 1000].sort_values(
        ["prediction_time", "categorical_value"]
    )
    assert stays["pheno"][0] == first["boolean_value"].astype(int).tolist()[:25]


# ----------------------------------------------------------------------------- bad input


def test_missing_data_column_is_rejected(meds):
    t = pq.read_table(meds / "data" / "1.parquet").drop_columns(["numeric_value"])
    pq.write_table(t, meds / "data" / "1.parquet")
    msg = rejected(meds)
    assert msg.endswith("1.parquet, column 'numeric_value': required MEDS column is missing")


def test_wrongly_typed_data_column_is_rejected(meds):
    t = pq.read_table(meds / "data" / "0.parquet")
    t = t.set_column(0, "subject_id", t.column("subject_id").cast(pa.string()))
    pq.write_table(t, meds / "data" / "0.parquet")
    assert "0.parquet, column 'subject_id': wrong type string, expected int64" in rejected(meds)


def test_unknown_split_name_is_rejected(meds):
    write_splits(meds / "metadata" / "subject_splits.parquet", SPLITS | {6: "validation"})
    msg = rejected(meds)
    assert "subject_splits.parquet, row 5, column 'split': split 'validation' is not a MEDS" in msg


def test_subject_in_two_splits_is_rejected_naming_it(meds):
    pq.write_table(
        pa.table({"subject_id": pa.array([1, 2, 3, 4, 5, 6, 2], pa.int64()),
                  "split": [*SPLITS.values(), "held_out"]}),
        meds / "metadata" / "subject_splits.parquet",
    )  # fmt: skip
    msg = rejected(meds)
    assert "row 6, column 'subject_id': subject 2 is listed again" in msg


def test_subject_with_a_split_but_no_data_is_rejected(meds):
    write_splits(meds / "metadata" / "subject_splits.parquet", SPLITS | {7: "train"})
    assert "row 6, column 'subject_id': subject 7 has a split but no events" in rejected(meds)


def test_label_for_an_unknown_subject_is_rejected(meds):
    labels = pq.read_table(meds.parent / "labels.parquet").to_pylist()
    write_labels(meds.parent / "labels.parquet", [*labels, labels[0] | {"subject_id": 9}])
    msg = rejected(meds)
    assert "labels.parquet, row 6, column 'subject_id': label for subject 9, which is not in" in msg


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_numeric_value_in_the_window_is_rejected(meds, bad):
    rows = [r for s in (4, 5, 6) for r in subject_events(s)]
    rows[3] = (4, h(10), "LAB//A", bad)
    write_events(meds / "data" / "1.parquet", rows)
    msg = rejected(meds)
    assert f"1.parquet, row 3, column 'numeric_value': numeric_value {bad} is not finite" in msg


def test_null_label_value_is_rejected(meds):
    labels = pq.read_table(meds.parent / "labels.parquet").to_pylist()
    labels[2]["boolean_value"] = None
    write_labels(meds.parent / "labels.parquet", labels)
    assert "labels.parquet, row 2, column 'boolean_value': missing (null) value" in rejected(meds)


def test_prediction_time_outside_the_subjects_data_is_rejected(meds):
    labels = pq.read_table(meds.parent / "labels.parquet").to_pylist()
    labels[1]["prediction_time"] = h(24 * 30)
    write_labels(meds.parent / "labels.parquet", labels)
    msg = rejected(meds)
    assert (
        "row 1, column 'prediction_time': prediction_time 2020-01-31T00:00:00 of subject 2" in msg
    )


def test_duplicate_label_is_rejected(meds):
    labels = pq.read_table(meds.parent / "labels.parquet").to_pylist()
    write_labels(meds.parent / "labels.parquet", [*labels, labels[3]])
    msg = rejected(meds)
    assert "row 6, column 'prediction_time': duplicate label for subject 4 at 2020-01-03" in msg


def test_incomplete_multilabel_stay_is_rejected(tmp_path):
    root = tmp_path / "meds"
    write_synthetic_meds(root, tmp_path / "labels.parquet", num_subjects=30, num_labels=3)
    labels = pq.read_table(tmp_path / "labels.parquet")
    pq.write_table(labels.slice(1), tmp_path / "labels.parquet")  # drops PHENO//00 of row 0
    msg = rejected(root, task_kind="multilabel")
    assert "has no row for label(s) ['PHENO//00']" in msg


def test_stay_with_no_observation_is_dropped_and_counted(meds, tmp_path):
    rows = [r for s in (4, 5, 6) for r in subject_events(s)]
    rows += [(7, h(100), "LAB//A", 1.0), (7, h(200), "LAB//A", 1.0)]
    write_events(meds / "data" / "1.parquet", rows)
    write_splits(meds / "metadata" / "subject_splits.parquet", SPLITS | {7: "train"})
    labels = pq.read_table(meds.parent / "labels.parquet").to_pylist()
    write_labels(meds.parent / "labels.parquet", [*labels, labels[0] | {"subject_id": 7,
                 "prediction_time": h(190)}])  # fmt: skip  # nothing in [h(142), h(190)]
    stays, _, manifest = read_meds(cfg_of(meds))
    assert "7@" not in " ".join(stays["stay_id"]) and len(stays) == 6
    assert manifest["meds"]["counts"]["stays_dropped_empty"] == 1


def test_unmatched_codes_are_an_error_when_asked(meds):
    msg = rejected(meds, unmatched_codes="error")
    assert "0.parquet, row 12, column 'code': code 'MEDS_BIRTH' matches no prefix" in msg


def test_multiclass_without_num_classes_is_a_params_error(meds):
    with pytest.raises(config.ConfigError, match="num_classes must be set"):
        cfg_of(meds, task_kind="multiclass")


def test_prepare_cli_prints_one_line_and_exits_1(meds, tmp_path):
    write_splits(meds / "metadata" / "subject_splits.parquet", SPLITS | {6: "dev"})
    params = tmp_path / "params.yaml"
    data = {"source": "meds", "out_dir": str(tmp_path / "out"), "meds": cfg_of(meds)}
    params.write_text(yaml.safe_dump({"data": data}))
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--params", str(params)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and not (tmp_path / "out").exists()
    assert out.stderr.count("\n") == 1 and "split 'dev' is not a MEDS split" in out.stderr


# ----------------------------------------------------------------------------- predictions


def test_binary_predictions_follow_the_meds_prediction_schema():
    ids = ["7@2020-01-03T00:00:00", "8@2020-01-04T12:30:00"]
    table = meds_predictions(ids, np.array([0.8, 0.2]), labels=np.array([1.0, np.nan]))
    assert table.schema == PREDICTION_SCHEMA
    rows = table.to_pylist()
    assert rows[0] == {
        "subject_id": 7,
        "prediction_time": h(48),
        "boolean_value": True,
        "predicted_boolean_value": True,
        "predicted_boolean_probability": pytest.approx(0.8),
    }
    assert rows[1]["boolean_value"] is None and rows[1]["predicted_boolean_value"] is False


def test_non_finite_probability_is_never_written():
    with pytest.raises(ValueError, match="stay '7@2020-01-03T00:00:00': probability nan"):
        meds_predictions(["7@2020-01-03T00:00:00"], np.array([np.nan]))


def test_stay_id_not_from_meds_is_refused():
    with pytest.raises(ValueError, match="is not '<subject_id>@<prediction_time>'"):
        stay_id_to_meds("132539")


def test_synthetic_meds_data_follow_the_meds_data_schema(tmp_path):
    write_synthetic_meds(tmp_path / "m", tmp_path / "l.parquet", num_subjects=10, num_shards=2)
    t = pq.read_table(tmp_path / "m" / "data" / "0.parquet")
    assert t.schema.names[:4] == ["subject_id", "time", "code", "numeric_value"]
    df = t.to_pandas()
    assert (df.groupby("subject_id").size() > 0).all()
    assert pd.Series(df["subject_id"]).is_monotonic_increasing  # subjects contiguous


def test_subject_with_events_but_no_split_is_rejected(meds):
    rows = [r for s in (4, 5, 6, 8) for r in subject_events(s)]
    write_events(meds / "data" / "1.parquet", rows)
    assert "column 'subject_id': subject 8 has events in" in rejected(meds)


def test_integer_and_float_labels_give_multiclass_and_regression_tasks(meds):
    rows = [{"subject_id": s, "prediction_time": h(48), "integer_value": s % 3,
             "float_value": s / 2} for s in SPLITS]  # fmt: skip
    write_labels(meds.parent / "labels.parquet", rows)
    stays, _, manifest = read_meds(
        cfg_of(meds, task="acuity", task_kind="multiclass", num_classes=3)
    )
    assert (
        stays["acuity"].tolist() == [1, 2, 0, 1, 2, 0] and manifest["tasks"][0]["num_outputs"] == 3
    )
    stays, _, _ = read_meds(cfg_of(meds, task="los", task_kind="regression"))
    assert stays["los"].tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    msg = rejected(meds, task_kind="multiclass", num_classes=2)
    assert "row 1, column 'integer_value': integer_value 2 is outside 0..1" in msg


def test_multilabel_name_outside_the_declared_classes_is_rejected(tmp_path):
    root = tmp_path / "meds"
    write_synthetic_meds(root, tmp_path / "labels.parquet", num_subjects=30, num_labels=3)
    msg = rejected(root, task_kind="multilabel", classes=["PHENO//00", "PHENO//01"])
    assert "column 'categorical_value': label 'PHENO//02' is not in data.meds.classes" in msg
