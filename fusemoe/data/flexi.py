"""The FlexiModal on-disk format: strict validation, train-only statistics, atomic writing.

A FlexiModal directory holds `stays.parquet`, `events.parquet`, `manifest.json` and one
`embeddings/<modality>.parquet` per embedding modality (format in docs/FLEXIMODAL.md). Every reader (PhysioNet 2012, synthetic, a user's own files) ends in
`write_flexi`, so every dataset passes the same validator and gets statistics computed the same way.
Errors are `FlexiModalError` with a one-line message naming file, row/record, column and problem;
rows are 0-based row numbers of the table. Events may arrive as a stream of batches
(`EventStream`): they are then checked, summarised and written batch by batch, so memory follows a
batch and one stay, not the events table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusemoe.data.location import file_name, read_text
from fusemoe.data.schema import (
    EVENTS_SCHEMA,
    MODALITY_KINDS,
    SCHEMA_VERSION,
    SPLITS,
    TASK_KINDS,
    embedding_file,
    embedding_modalities,
    embedding_schema,
    series_modalities,
    static_variables,
    stays_schema,
    type_matches,
)

STAYS_FILE = "stays.parquet"
# Optional stays column: the person a stay belongs to. When present, no subject may be in two
# splits (checked), and `assign_splits` keeps each subject's stays together.
SUBJECT_COLUMN = "subject_id"
EVENTS_FILE = "events.parquet"
MANIFEST_FILE = "manifest.json"


class FlexiModalError(ValueError):
    """Bad input data. The message is one line: `file, where, column: problem`."""

    def __init__(
        self,
        file: str | os.PathLike,
        problem: str,
        *,
        row: int | None = None,
        line: int | None = None,
        record: str | None = None,
        column: str | None = None,
    ):
        where = [str(file)]
        if record is not None:
            where.append(f"record {record}")
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        msg = ", ".join(where) + ": " + problem
        super().__init__(" ".join(msg.split()))  # always one line
        self.file, self.problem, self.row, self.column = str(file), problem, row, column


# ----------------------------------------------------------------------------- manifest


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read and check `manifest.json` of a FlexiModal directory."""
    path = file_name(directory, MANIFEST_FILE)
    text = read_text(directory, MANIFEST_FILE)  # a local path or a pyarrow URI (s3://...)
    if text is None:
        raise FlexiModalError(path, "file not found")
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexiModalError(path, f"not valid JSON ({e})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, file: str | os.PathLike = MANIFEST_FILE) -> None:
    """The parts of a manifest a user must write: modalities and tasks (the rest is derived)."""

    def bad(problem: str, column: str | None = None) -> FlexiModalError:
        return FlexiModalError(file, problem, column=column)

    if not isinstance(manifest, dict):
        raise bad("manifest must be a JSON object")
    version = str(manifest.get("schema_version", SCHEMA_VERSION))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise bad(f"schema_version {version} is not compatible with {SCHEMA_VERSION}")
    mods = manifest.get("modalities")
    if not isinstance(mods, list) or not mods:
        raise bad("'modalities' must be a non-empty list")
    names: set[str] = set()
    for m in mods:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise bad(f"modality entry {m!r} needs a non-empty 'name'")
        name = m["name"]
        if name in names:
            raise bad(f"modality '{name}' is listed twice")
        names.add(name)
        if m.get("kind") not in MODALITY_KINDS:
            raise bad(
                f"modality '{name}' has kind {m.get('kind')!r}, expected one of {MODALITY_KINDS}"
            )
        if m["kind"] == "embedding":
            if version == "1.0":
                raise bad(f"embedding modality '{name}' needs schema_version 1.1 (file says 1.0)")
            width = m.get("width")
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise bad(
                    f"embedding modality '{name}' needs an integer 'width' >= 1, got {width!r}"
                )
            continue
        var = m.get("variables")
        if not isinstance(var, list) or not var or not all(isinstance(v, str) and v for v in var):
            raise bad(f"modality '{name}' needs a non-empty list of variable names")
        if len(set(var)) != len(var):
            raise bad(f"modality '{name}' lists a variable twice")
    if sum(m["kind"] == "static" for m in mods) > 1:
        raise bad("at most one static modality is allowed")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise bad("'tasks' must be a non-empty list")
    columns = {"stay_id", "split", SUBJECT_COLUMN, *static_variables(manifest)}
    task_names: set[str] = set()
    for t in tasks:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"task entry {t!r} needs a non-empty 'name'")
        t.setdefault("column", t["name"])
        if t.get("kind") not in TASK_KINDS:
            raise bad(
                f"task '{t['name']}' has kind {t.get('kind')!r}, expected one of {TASK_KINDS}"
            )
        n = t.setdefault("num_outputs", 1)
        if not isinstance(n, int) or n < 1 or (t["kind"] == "multiclass" and n < 2):
            raise bad(f"task '{t['name']}' has invalid num_outputs {n!r}")
        if t["kind"] in ("binary", "regression") and n != 1:
            raise bad(f"task '{t['name']}' of kind {t['kind']} must have num_outputs 1")
        if t["name"] in task_names:
            raise bad(f"task '{t['name']}' is listed twice")
        task_names.add(t["name"])
        if t["column"] in columns:
            raise bad(f"task '{t['name']}' column '{t['column']}' collides with another column")
        columns.add(t["column"])


# ----------------------------------------------------------------------------- validation


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric column to numpy with nulls as NaN (float) — nulls are checked separately."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_floating(arr.type):
        return arr.to_numpy(zero_copy_only=False)
    return arr.fill_null(0).to_numpy(zero_copy_only=False)


def _check_columns(table: pa.Table, schema: pa.Schema, file: str) -> None:
    expected = set(schema.names)
    for name in table.column_names:
        if name not in expected:
            raise FlexiModalError(
                file, "unknown column (not in the FlexiModal schema)", column=name
            )
    if len(set(table.column_names)) != len(table.column_names):
        raise FlexiModalError(file, "duplicate column names")
    for field in schema:
        if field.name not in table.column_names:
            raise FlexiModalError(file, "required column is missing", column=field.name)
        actual = table.schema.field(field.name).type
        if not type_matches(actual, field.type):
            raise FlexiModalError(
                file, f"wrong type {actual}, expected {field.type}", column=field.name
            )


def _strings(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Dictionary codes (int64, -1 = null) and the dictionary of a string column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    codes = arr.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, arr.dictionary.to_pylist()


def _check_no_nulls(table: pa.Table, file: str, columns: list[str]) -> None:
    for name in columns:
        col = table.column(name)
        if col.null_count:
            mask = pc.is_null(col).to_numpy(zero_copy_only=False)
            raise FlexiModalError(file, "missing (null) value", row=_first(mask), column=name)


def _stay_rows(table: pa.Table, stays: pa.Table, file, stays_file) -> np.ndarray:
    """Row of stays.parquet that each row of `table` belongs to; an unknown stay is an error."""
    stay_ids = stays.column("stay_id").combine_chunks().cast(pa.string())
    pos = pc.index_in(table.column("stay_id"), value_set=stay_ids)
    pos_np = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if (pos_np < 0).any():
        i = _first(pos_np < 0)
        sid = table.column("stay_id")[i].as_py()
        raise FlexiModalError(
            file, f"stay_id '{sid}' is not in {stays_file}", row=i, column="stay_id"
        )
    return pos_np


def _check_times(table: pa.Table, file) -> np.ndarray:
    """A table's `time_h` as numpy: finite and not negative (hours since the stay began)."""
    time = _np(table.column("time_h"))
    _check_finite(time, file, "time_h", "time")
    neg = time < 0
    if neg.any():
        i = _first(neg)
        raise FlexiModalError(file, f"negative time {time[i]} h", row=i, column="time_h")
    return time


def _check_finite(values: np.ndarray, file: str, column: str, what: str = "value") -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i = _first(bad)
        raise FlexiModalError(file, f"{what} is not finite ({values[i]})", row=i, column=column)


# Lossless casts. Users' pandas frames hold int64 labels and float64 times/values; prepare stores
# the schema's narrow types when no value changes beyond float32 rounding (and says so in the
# manifest's `casts`). A value is castable to an integer type when it is integral and in range, to
# float32 when it stays finite and within float32's relative rounding error 2**-24 (half a unit in
# the last place), i.e. 0 or inside float32's normal range; NaN/inf pass through to the validator.
FLOAT32_ROUNDING = 2.0**-24


def lossy_values(arr: pa.Array, target: pa.DataType) -> np.ndarray | None:
    """Mask of the values of a numeric (or boolean, or all-null) array that a cast to the numeric
    `target` would change beyond the rule above; None when it is no numeric cast at all."""
    numeric = pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
    if pa.types.is_null(arr.type):
        return np.zeros(len(arr), dtype=bool)
    if not (numeric or pa.types.is_boolean(arr.type)):
        return None
    if not (pa.types.is_integer(target) or pa.types.is_floating(target)):
        return None
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    v = arr.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(target):
        info = np.iinfo(target.to_pandas_dtype())
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v != np.round(v)) | (v < info.min) | (v > info.max)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            v32 = v.astype(target.to_pandas_dtype()).astype(np.float64)
            err = np.abs(v32 - v)
        bad = np.isfinite(v) & (~np.isfinite(v32) | (err > np.abs(v) * FLOAT32_ROUNDING))
    return bad & valid


def cast_losslessly(
    col: pa.ChunkedArray | pa.Array, target: pa.DataType, file: str, column: str
) -> pa.Array | None:
    """`col` cast to `target` (lists element-wise), or None when it is no numeric cast (the
    validator then reports the wrong type); a lossy value is a FlexiModalError naming its row."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    is_list = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    if pa.types.is_list(target) and is_list:
        bad = lossy_values(arr.flatten(), target.value_type)
        rows = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        values = arr.flatten()
    elif not is_list:
        bad = lossy_values(arr, target)
        rows = np.arange(len(arr))
        values = arr
    else:
        return None
    if bad is None:
        return None
    if bad.any():
        i = _first(bad)
        raise FlexiModalError(
            file,
            f"value {values[i].as_py()!r} does not fit {target} without loss (column type "
            f"{arr.type}; only lossless casts are applied)",
            row=int(rows[i]),
            column=column,
        )
    return arr.cast(target, safe=False)


def conform_types(table: pa.Table, schema: pa.Schema, file: str) -> tuple[pa.Table, dict]:
    """`table` with every numeric column of `schema`'s wrong type cast losslessly to its type;
    also returns {column: "int64 -> int8"} of the casts made."""
    casts: dict[str, str] = {}
    for field in schema:
        if field.name not in table.column_names:
            continue
        col = table.column(field.name)
        if type_matches(col.type, field.type):
            continue
        cast = cast_losslessly(col, field.type, file, field.name)
        if cast is not None:
            table = table.set_column(table.column_names.index(field.name), field.name, cast)
            casts[field.name] = f"{col.type} -> {field.type}"
    return table, casts


def validate(
    stays: pa.Table,
    events: pa.Table | Iterable[pa.Table | pa.RecordBatch],
    manifest: dict,
    *,
    stays_file: str = STAYS_FILE,
    events_file: str = EVENTS_FILE,
    manifest_file: str = MANIFEST_FILE,
    embeddings: dict[str, pa.Table] | None = None,
    embedding_files: dict[str, str] | None = None,
) -> None:
    """Strict check of a FlexiModal dataset; raises FlexiModalError on the first problem.

    `events` is a table or a stream of batches as `write_flexi` takes them. `embeddings` holds
    one table per embedding modality of the manifest (`embedding_files` names them in errors;
    default `embeddings/<modality>.parquet`)."""
    observed = _validate_stays_and_embeddings(
        stays, manifest, stays_file, manifest_file, embeddings or {}, embedding_files
    )
    check = EventStream(stays, manifest, events_file, stays_file)
    for batch in event_batches(events):
        check.add(batch)
    check.finish(observed)


def _validate_stays_and_embeddings(
    stays: pa.Table,
    manifest: dict,
    stays_file: str,
    manifest_file: str,
    embeddings: dict[str, pa.Table],
    embedding_files: dict[str, str] | None,
) -> np.ndarray:
    """Everything but the events; returns which stays have an embedding vector."""
    check_manifest(manifest, manifest_file)
    _validate_stays(stays, manifest, stays_file)
    files = _embedding_labels(manifest, embeddings, embedding_files)
    observed = np.zeros(stays.num_rows, dtype=bool)
    for m in embedding_modalities(manifest):
        observed |= validate_embedding(
            embeddings[m["name"]], m, stays, files[m["name"]], stays_file
        )
    return observed


def _embedding_labels(
    manifest: dict, embeddings: dict, labels: dict[str, str] | None
) -> dict[str, str]:
    """File label of every embedding table, after checking tables and manifest agree."""
    labels = {m: embedding_file(m) for m in embeddings} | (labels or {})
    declared = {m["name"] for m in embedding_modalities(manifest)}
    for name in embeddings:
        if name not in declared:
            raise FlexiModalError(
                labels[name], f"modality '{name}' is not an embedding modality of the manifest"
            )
    for name in sorted(declared - set(embeddings)):
        raise FlexiModalError(
            labels.get(name, embedding_file(name)),
            f"file not found (the manifest declares embedding modality '{name}')",
        )
    return labels


def conform_vectors(table: pa.Table, width: int, file: str) -> tuple[pa.Table, dict]:
    """An embedding table with stay_id/time_h cast losslessly as in `conform_types` and its
    `vector` column as fixed_size_list<float32, width>: a (large/fixed-size) list of a numeric
    type whose rows all hold `width` values, cast losslessly. Also returns the casts made."""
    schema = embedding_schema(width)
    table, casts = conform_types(table, pa.schema([f for f in schema if f.name != "vector"]), file)
    if "vector" not in table.column_names:
        return table, casts  # the column check reports it
    col = table.column("vector").combine_chunks()
    expected = schema.field("vector").type
    if col.type == expected:
        return table, casts
    is_list = (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
    )
    if not is_list:
        raise FlexiModalError(
            file,
            f"wrong type {col.type}, expected {expected} (one vector per row)",
            column="vector",
        )
    _check_no_nulls(table, file, ["vector"])
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    wrong = lengths != width
    if wrong.any():
        i = _first(wrong)
        raise FlexiModalError(
            file, f"vector has {lengths[i]} values, expected width {width}", row=i, column="vector"
        )
    flat = col.flatten()
    if flat.null_count:
        i = int(
            pc.list_parent_indices(col)[
                _first(pc.is_null(flat).to_numpy(zero_copy_only=False))
            ].as_py()
        )
        raise FlexiModalError(
            file, "missing (null) value inside the vector", row=i, column="vector"
        )
    if pa.types.is_fixed_size_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))  # what cast_losslessly handles
    values = cast_losslessly(col, pa.list_(pa.float32()), file, "vector")
    if values is None:
        raise FlexiModalError(file, f"wrong type {col.type}, expected {expected}", column="vector")
    vectors = pa.FixedSizeListArray.from_arrays(values.flatten(), width)
    casts["vector"] = f"{table.column('vector').type} -> {expected}"
    table = table.set_column(table.column_names.index("vector"), "vector", vectors)
    return table, casts


def vector_array(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """float32 [rows, width] view of a fixed_size_list<float32, width> column (no row loop)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def validate_embedding(
    table: pa.Table, modality: dict, stays: pa.Table, file: str, stays_file: str
) -> np.ndarray:
    """One embedding modality's vectors against the manifest and the (validated) stays; returns
    which stays have a vector."""
    name, width = modality["name"], modality["width"]
    schema = embedding_schema(width)
    vec = table.column("vector").type if "vector" in table.column_names else None
    if vec is not None and pa.types.is_fixed_size_list(vec) and vec.list_size != width:
        raise FlexiModalError(
            file, f"vectors have width {vec.list_size}, the manifest says {width}", column="vector"
        )
    _check_columns(table, schema, file)
    _check_no_nulls(table, file, schema.names)
    time = _check_times(table, file)
    start = 0
    for chunk in table.column("vector").chunks:  # chunk by chunk: no copy of all the vectors
        vectors = vector_array(chunk, width)
        if not np.isfinite(vectors).all():
            i, j = np.argwhere(~np.isfinite(vectors))[0]
            raise FlexiModalError(
                file,
                f"vector value {j} is not finite ({vectors[i, j]})",
                row=start + int(i),
                column="vector",
            )
        start += len(chunk)
    pos_np = _stay_rows(table, stays, file, stays_file)
    i = _first_repeat(pos_np, np.zeros_like(pos_np), time)
    if i is not None:
        raise FlexiModalError(
            file,
            f"stay '{table.column('stay_id')[i].as_py()}' already has a {name} vector at "
            f"{time[i]} h (one vector per time; average or drop repeats)",
            row=i,
            column="time_h",
        )
    return np.bincount(pos_np, minlength=stays.num_rows) > 0


def _stays_schema_of(stays: pa.Table, manifest: dict) -> pa.Schema:
    """The manifest's stays schema, plus the optional subject_id column when `stays` has one."""
    schema = stays_schema(manifest)
    if SUBJECT_COLUMN in stays.column_names:
        schema = schema.insert(1, pa.field(SUBJECT_COLUMN, pa.string(), nullable=False))
    return schema


def _check_subjects(stays: pa.Table, split: pd.Series, file: str) -> None:
    """No subject in two splits: a model selected or tested on a person it was trained on
    overstates its performance."""
    _check_no_nulls(stays, file, [SUBJECT_COLUMN])
    subject = stays.column(SUBJECT_COLUMN).to_pandas().astype(str)
    first = split.groupby(subject.to_numpy(), sort=False).transform("first")
    bad = (split != first).to_numpy()
    if bad.any():
        i = _first(bad)
        j = _first((subject == subject.iloc[i]).to_numpy())
        raise FlexiModalError(
            file,
            f"subject '{subject.iloc[i]}' is in split '{split.iloc[i]}' here and in "
            f"'{split.iloc[j]}' at row {j} (all stays of a subject must share one split)",
            row=i,
            column="split",
        )


def _validate_stays(stays: pa.Table, manifest: dict, file: str) -> None:
    _check_columns(stays, _stays_schema_of(stays, manifest), file)
    _check_no_nulls(stays, file, ["stay_id", "split"])
    ids = stays.column("stay_id").to_pandas()
    empty = (ids.str.len() == 0).to_numpy()
    if empty.any():
        raise FlexiModalError(file, "empty stay_id", row=_first(empty), column="stay_id")
    dup = ids.duplicated().to_numpy()
    if dup.any():
        i = _first(dup)
        first = int(np.flatnonzero((ids == ids.iloc[i]).to_numpy())[0])
        raise FlexiModalError(
            file,
            f"duplicate stay_id '{ids.iloc[i]}' (first at row {first})",
            row=i,
            column="stay_id",
        )
    split = stays.column("split").to_pandas().astype(str)
    bad = ~split.isin(SPLITS).to_numpy()
    if bad.any():
        i = _first(bad)
        raise FlexiModalError(
            file, f"split '{split.iloc[i]}' is not one of {SPLITS}", row=i, column="split"
        )
    for s in SPLITS:
        if not (split == s).any():
            raise FlexiModalError(file, f"split '{s}' is empty (no stays)", column="split")
    if SUBJECT_COLUMN in stays.column_names:
        _check_subjects(stays, split, file)
    for t in manifest["tasks"]:
        _validate_label(stays.column(t["column"]), t, file)
    for v in static_variables(manifest):
        col = stays.column(v)
        vals = _np(col)
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        _check_finite(np.where(valid, vals, 0.0), file, v, "static value (use null for missing)")


def _validate_label(col: pa.ChunkedArray, task: dict, file: str) -> None:
    kind, name, n = task["kind"], task["column"], task["num_outputs"]
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    if kind == "multilabel":
        for i, row in enumerate(col.to_pylist()):
            if row is None:
                continue
            if len(row) != n or any(x not in (0, 1) for x in row):
                raise FlexiModalError(
                    file,
                    f"multilabel label {row} must be {n} values in {{0,1}}",
                    row=i,
                    column=name,
                )
        return
    vals = _np(col)
    if kind == "regression":
        _check_finite(
            np.where(valid, vals, 0.0), file, name, "regression label (use null for missing)"
        )
        return
    domain = (0, 1) if kind == "binary" else (0, n - 1)
    bad = valid & ((vals < domain[0]) | (vals > domain[1]))
    if bad.any():
        i = _first(bad)
        raise FlexiModalError(
            file,
            f"label {vals[i]} of task '{task['name']}' is outside its domain {domain[0]}..{domain[1]}",
            row=i,
            column=name,
        )


# Events are checked, summarised and written EVENT_BATCH_ROWS rows at a time: the checks'
# temporaries take about 0.1 KiB per row, so a batch costs tens of MiB whatever the table's size.
EVENT_BATCH_ROWS = 1 << 18
EVENTS_ROW_GROUP = 1 << 20  # rows per Parquet row group of events.parquet


class EventsNotGrouped(FlexiModalError):
    """A stream of event batches in which a stay's events resume after other stays' events.

    A stream must keep each stay's rows together (any order inside a batch; a stay may run on
    from the end of one batch into the next), which is what lets `EventStream` find repeats
    while holding one batch and one stay. A whole table may be in any order."""


def event_batches(
    events: pa.Table | pd.DataFrame | Iterable[pa.Table | pa.RecordBatch],
) -> Iterator[pa.Table]:
    """`events` as tables: a table or DataFrame is one batch (it is in memory already, and may
    be in any order); a stream's batches are cut into slices of at most EVENT_BATCH_ROWS rows."""
    if isinstance(events, pd.DataFrame | pa.Table):
        yield _as_table(events)
        return
    for batch in events:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        for start in range(0, max(batch.num_rows, 1), EVENT_BATCH_ROWS):
            yield batch.slice(start, EVENT_BATCH_ROWS)


def _shifted(e: FlexiModalError, rows: int) -> FlexiModalError:
    """`e` with its row counted from the start of the whole events table, not of the batch."""
    if e.row is None or rows == 0:
        return e
    return type(e)(e.file, e.problem, row=e.row + rows, column=e.column)


class EventStream:
    """Validates events batch by batch against the manifest and the validated stays, and keeps
    only what the statistics need: exact sums of the train split's values per variable, event
    and stay counts per variable, and which stays have each series modality.

    Two values of one (stay, variable, time) are found because each stay's rows are kept
    together (see `EventsNotGrouped`): the rows of the stay the last batch ended with are
    carried into the next batch's check, so memory follows one batch plus one stay, not the
    table. Row numbers in errors count from the start of the whole table."""

    def __init__(self, stays: pa.Table, manifest: dict, file: str, stays_file: str):
        self.stays, self.manifest, self.file, self.stays_file = stays, manifest, file, stays_file
        self.series = series_modalities(manifest)
        self.variables = [(m["name"], v) for m in self.series for v in m["variables"]]
        self.first_variable = np.cumsum([0] + [len(m["variables"]) for m in self.series])
        self.stay_ids = stays.column("stay_id").combine_chunks().cast(pa.string())
        self.train = np.asarray(stays.column("split").to_pylist(), dtype=object) == "train"
        self.rows = 0
        self.casts: dict[str, str] = {}
        self.moments = _Moments(len(self.variables))
        self.per_variable = np.zeros(len(self.variables), np.int64)  # events
        self.stays_per_variable = np.zeros(len(self.variables), np.int64)
        self.modality_of = np.repeat(np.arange(len(self.series)), np.diff(self.first_variable))
        self.present = np.zeros((len(self.series), stays.num_rows), dtype=bool)
        self.seen = np.zeros(stays.num_rows, dtype=bool)  # stays with an event so far
        # (stay, variable, time, row) of the last stay's rows so far, and its variables
        self.carry: tuple[np.ndarray, ...] | None = None
        self.carry_variables = np.zeros(0, np.int64)

    def add(self, events: pa.Table, conform: bool = False) -> pa.Table:
        """Checks one batch (cast losslessly first when `conform`); returns it as checked."""
        try:
            if conform:
                events, casts = conform_types(events, EVENTS_SCHEMA, self.file)
                self.casts.update(casts)
            stay, var, time, value = self._check(events)
        except FlexiModalError as e:
            raise _shifted(e, self.rows) from None
        carried = self.carry[0][0] if self.carry is not None else -1
        self._check_repeats(stay, var, time)
        self.rows += events.num_rows
        in_train = self.train[stay]
        self.moments.add(var[in_train], value[in_train])
        self.per_variable += np.bincount(var, minlength=len(self.variables))
        self.present[self.modality_of[var], stay] = True
        self._count_stays(stay, var, carried)
        return events

    def _count_stays(self, stay: np.ndarray, var: np.ndarray, carried: int) -> None:
        """Stays per variable: the distinct (stay, variable) pairs of this batch, less those of
        the stay carried over from the last batch that it already counted (a stream keeps each
        stay's rows together, so no other stay can be counted twice)."""
        if stay.size == 0:
            return
        width = len(self.variables)
        pairs = np.unique(stay.astype(np.int64) * width + var)
        pair_stay, pair_var = pairs // width, pairs % width
        counted = (pair_stay == carried) & np.isin(pair_var, self.carry_variables)
        self.stays_per_variable += np.bincount(pair_var[~counted], minlength=width)
        last = pair_stay == stay[-1]
        if stay[-1] == carried:
            self.carry_variables = np.union1d(self.carry_variables, pair_var[last])
        else:
            self.carry_variables = pair_var[last]

    def _check(self, events: pa.Table) -> tuple[np.ndarray, ...]:
        """Row-wise checks of one batch; (stay row, variable index, time, value) of its rows."""
        file, manifest, series = self.file, self.manifest, self.series
        _check_columns(events, EVENTS_SCHEMA, file)
        _check_no_nulls(events, file, EVENTS_SCHEMA.names)
        time = _check_times(events, file)
        value = _np(events.column("value"))
        _check_finite(value, file, "value")

        mod_codes, mod_dict = _strings(events.column("modality"))
        known_mod = {m["name"]: k for k, m in enumerate(series)}
        static_names = {m["name"] for m in manifest["modalities"] if m["kind"] == "static"}
        mod_map = np.array([known_mod.get(m, -1) for m in mod_dict] + [-1], dtype=np.int64)
        mod_idx = mod_map[mod_codes]
        if (mod_idx < 0).any():
            i = _first(mod_idx < 0)
            name = mod_dict[mod_codes[i]]
            embedding_names = {m["name"] for m in embedding_modalities(manifest)}
            why = (
                "is static (static values belong in stays.parquet)"
                if name in static_names
                else f"is an embedding modality (its vectors belong in {embedding_file(name)})"
                if name in embedding_names
                else "is not a series modality of the manifest"
            )
            raise FlexiModalError(file, f"modality '{name}' {why}", row=i, column="modality")
        var_codes, var_dict = _strings(events.column("variable"))
        index = np.full((len(series), len(var_dict)), -1, dtype=np.int64)  # -> self.variables
        for k, m in enumerate(series):
            at = {v: self.first_variable[k] + j for j, v in enumerate(m["variables"])}
            index[k] = [at.get(v, -1) for v in var_dict]
        var = index[mod_idx, var_codes]
        if (var < 0).any():
            i = _first(var < 0)
            raise FlexiModalError(
                file,
                f"unknown variable '{var_dict[var_codes[i]]}' for modality "
                f"'{series[mod_idx[i]]['name']}' (not in the manifest)",
                row=i,
                column="variable",
            )
        stay = _stay_rows(events, self.stays, file, self.stays_file)
        return stay, var, time, value

    def _check_repeats(self, stay: np.ndarray, var: np.ndarray, time: np.ndarray) -> None:
        """Two values of one variable at the same time of a stay: the model's input holds one
        value per (time, variable), so one of them would silently be lost."""
        if stay.size == 0:
            return
        rows = np.arange(self.rows, self.rows + stay.size)
        resumed = self.seen[stay]
        if self.carry is not None:
            resumed &= stay != self.carry[0][0]
        if resumed.any():
            i = _first(resumed)
            raise EventsNotGrouped(
                self.file,
                f"events of stay '{self.stay_ids[stay[i]].as_py()}' resume after other stays' "
                "(a stream of event batches must keep each stay's rows together)",
                row=int(rows[i]),
                column="stay_id",
            )
        self.seen[stay] = True
        if self.carry is not None:
            stay, var, time, rows = (
                np.concatenate([c, x])
                for c, x in zip(self.carry, (stay, var, time, rows), strict=True)
            )
        i = _first_repeat(stay, var, time)  # the carried stay's rows come first: table order
        if i is not None:
            modality, variable = self.variables[var[i]]
            raise FlexiModalError(
                self.file,
                f"stay '{self.stay_ids[stay[i]].as_py()}' already has a value of {modality} "
                f"'{variable}' at {time[i]} h (one value per variable and time; average or drop "
                "repeats)",
                row=int(rows[i]),
                column="time_h",
            )
        last = stay == stay[-1]
        self.carry = (stay[last], var[last], time[last], rows[last])

    def finish(self, observed: np.ndarray | None = None) -> None:
        """After the last batch: every stay needs an observation (an event, a static value, or
        an embedding vector in `observed`)."""
        has = self.seen.copy()
        for v in static_variables(self.manifest):
            has |= pc.is_valid(self.stays.column(v)).to_numpy(zero_copy_only=False)
        if observed is not None:
            has |= observed
        if not has.all():
            i = _first(~has)
            raise FlexiModalError(
                self.stays_file,
                f"stay '{self.stay_ids[i].as_py()}' has no observations at all (no events, no "
                "static values)",
                row=i,
            )


def validate_events(
    events: pa.Table,
    stays: pa.Table,
    manifest: dict,
    file: str,
    stays_file: str,
    observed: np.ndarray | None = None,
) -> None:
    """Events (a table, or a stream as `write_flexi` takes it) against the manifest and the
    (already validated) stays; `observed` marks stays with observations elsewhere (embedding
    vectors), which need no event or static value."""
    check = EventStream(stays, manifest, file, stays_file)
    for batch in event_batches(events):
        check.add(batch)
    check.finish(observed)


def _first_repeat(stay: np.ndarray, variable: np.ndarray, time: np.ndarray) -> int | None:
    """The first row (in table order) whose (stay, variable, time) occurs in an earlier row.

    One int64 key (stay | variable | float32 time bits), sorted: about a second for P12's 5M
    events, where a 3-key lexsort takes tens of seconds."""
    if len(stay) < 2:
        return None
    var_bits = max(int(variable.max()), 1).bit_length()
    if int(stay.max()).bit_length() + var_bits + 32 > 63:  # too many stays/variables for one key
        order = np.lexsort((time, variable, stay))
        keys = [k[order] for k in (stay, variable, time)]
        same = np.logical_and.reduce([k[1:] == k[:-1] for k in keys])
    else:
        key = (stay.astype(np.int64) << (var_bits + 32)) | (variable.astype(np.int64) << 32)
        key |= np.ascontiguousarray(time, dtype=np.float32).view(np.uint32).astype(np.int64)
        ordered = np.sort(key)  # (np.unique is far slower on millions of int64 keys)
        if not (ordered[1:] == ordered[:-1]).any():
            return None
        order = np.argsort(key, kind="stable")
        same = key[order[1:]] == key[order[:-1]]
    return int(order[1:][same].min()) if same.any() else None


def read_tables(
    directory: str | os.PathLike, *, batches: bool = False
) -> tuple[pa.Table, pa.Table | Iterator[pa.RecordBatch]]:
    """Read stays and events Parquet files, turning read failures into FlexiModalError.

    With `batches`, events come as a stream of record batches of EVENT_BATCH_ROWS rows (the file
    is opened here, so a missing or unreadable file is reported before anything is read)."""
    out = []
    for name in (STAYS_FILE, EVENTS_FILE):
        path = Path(directory) / name
        if not path.is_file():
            raise FlexiModalError(path, "file not found")
        try:
            if batches and name == EVENTS_FILE:
                out.append(_record_batches(pq.ParquetFile(path), path))
            else:
                out.append(pq.read_table(path))
        except (pa.ArrowException, OSError) as e:
            raise FlexiModalError(path, f"not a readable Parquet file ({e})") from None
    return out[0], out[1]


def _record_batches(file: pq.ParquetFile, path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from file.iter_batches(batch_size=EVENT_BATCH_ROWS)
    except (pa.ArrowException, OSError) as e:
        raise FlexiModalError(path, f"not a readable Parquet file ({e})") from None
    finally:
        file.close()


def read_embeddings(directory: str | os.PathLike, manifest: dict) -> dict[str, pa.Table]:
    """The embedding tables of a local FlexiModal directory, one per embedding modality of the
    manifest; a declared modality without its file, or a file no modality declares, is an error."""
    d = Path(directory)
    declared = {m["name"] for m in embedding_modalities(manifest)}
    for path in sorted((d / "embeddings").glob("*.parquet")):
        if path.stem not in declared:
            raise FlexiModalError(
                path, f"modality '{path.stem}' is not an embedding modality of the manifest"
            )
    out = {}
    for name in sorted(declared):
        path = d / embedding_file(name)
        if not path.is_file():
            raise FlexiModalError(
                path, f"file not found (the manifest declares embedding modality '{name}')"
            )
        try:
            out[name] = read_vectors(path)
        except (pa.ArrowException, OSError) as e:
            raise FlexiModalError(path, f"not a readable Parquet file ({e})") from None
    return out


# Rows per Parquet row group of an embedding file: about 16 MiB of vectors.
def vector_row_group_rows(width: int) -> int:
    return max(1024, (16 << 20) // (4 * width))


def read_vectors(
    path: str, filesystem: pa.fs.FileSystem | None = None, stay_ids: pa.Array | None = None
) -> pa.Table:
    """An embedding file read in batches of rows (of `stay_ids` only, when given).

    `pq.read_table` decodes a whole row group of a list column with several transient buffers of
    its size (a 10^5 x 768 file in one row group peaks at about 5x its vectors); batch by batch,
    the peak is the vectors kept plus one batch, and reading is faster too."""
    source = filesystem.open_input_file(path) if filesystem is not None else path
    with pq.ParquetFile(source) as f:
        parts = []
        for batch in f.iter_batches(batch_size=4096):
            if stay_ids is not None:
                batch = batch.filter(pc.is_in(batch.column("stay_id"), value_set=stay_ids))
            parts.append(batch)
        return pa.Table.from_batches(parts, schema=f.schema_arrow)


def validate_dir(directory: str | os.PathLike) -> dict:
    """Validate a FlexiModal directory, reading events.parquet batch by batch (as one table
    when its rows do not keep each stay's events together); returns its manifest."""
    d = Path(directory)
    manifest = load_manifest(d)
    stays, events = read_tables(d, batches=True)
    embeddings = read_embeddings(d, manifest)
    labels = {
        "stays_file": str(d / STAYS_FILE),
        "events_file": str(d / EVENTS_FILE),
        "manifest_file": str(d / MANIFEST_FILE),
        "embeddings": embeddings,
        "embedding_files": {m: str(d / embedding_file(m)) for m in embeddings},
    }
    try:
        validate(stays, events, manifest, **labels)
    except EventsNotGrouped:
        validate(stays, read_tables(d)[1], manifest, **labels)
    return manifest


# ----------------------------------------------------------------------------- statistics


class _Moments:
    """Exact count, sum and sum of squares of float32 values per group, added batch by batch.

    A finite float32 is +-m * 2**(e - 150) with an integer m < 2**24 and an exponent field e,
    so per (group, e) the sums of m (and of m**2, with m split in 12-bit halves) are sums of
    integers, exact in int64. Mean and standard deviation follow from the exact totals with one
    rounding each, so they do not depend on how the values were cut into batches or ordered."""

    def __init__(self, groups: int):
        self.count = np.zeros(groups, np.int64)
        self.sums = np.zeros((4, groups * 256), np.int64)  # m, a*a, 2*a*b, b*b (m = a*4096 + b)

    def add(self, group: np.ndarray, values: np.ndarray) -> None:
        step = 1 << 27  # bincount adds float64: exact while a bin's sum stays below 2**53
        for start in range(0, len(values), step):
            g, bits = group[start : start + step], values[start : start + step]
            bits = np.ascontiguousarray(bits, np.float32).view(np.uint32)
            field = (bits >> 23) & 0xFF
            m = (bits & 0x7FFFFF) | ((field > 0).astype(np.uint32) << 23)
            bins = g.astype(np.int64) * 256 + np.maximum(field, 1)  # subnormals: scale of e=1
            a, b = (m >> 12).astype(np.float64), (m & 0xFFF).astype(np.float64)
            signed = np.where(bits >> 31, -1.0, 1.0) * m
            n = self.sums.shape[1]
            for k, w in enumerate((signed, a * a, 2 * a * b, b * b)):
                self.sums[k] += np.bincount(bins, weights=w, minlength=n).astype(np.int64)
            self.count += np.bincount(g, minlength=self.count.size)

    def stats(self, group: int) -> dict:
        """{mean, std, count}; std 1 when it is 0 (constant values) or there are no values."""
        n = int(self.count[group])
        if n == 0:
            return {"mean": 0.0, "std": 1.0, "count": 0}
        rows = self.sums[:, group * 256 : (group + 1) * 256]
        total = squares = 0  # sum * 2**150 and sum of squares * 2**300, as exact integers
        for e in np.flatnonzero(rows.any(axis=0)).tolist():
            m, aa, ab2, bb = (int(x) for x in rows[:, e])
            total += m << e
            squares += ((aa << 24) + (ab2 << 12) + bb) << (2 * e)
        mean = Fraction(total, n << 150)
        std = _sqrt(Fraction(n * squares - total * total, (n * n) << 300))
        return {"mean": float(mean), "std": std if std > 0 else 1.0, "count": n}


def _sqrt(x: Fraction) -> float:
    """The correctly rounded square root of a non-negative fraction: an integer square root
    with 64+ bits, its last bit set when inexact so that float() rounds as the exact root."""
    if x == 0:
        return 0.0
    k = max(0, 64 - (x.numerator.bit_length() - x.denominator.bit_length()) // 2)
    scaled = (x.numerator << (2 * k)) // x.denominator
    root = math.isqrt(scaled)
    if root * root * x.denominator != x.numerator << (2 * k):
        root |= 1
    return float(Fraction(root, 1 << k))


def _stats(values: np.ndarray) -> dict:
    moments = _Moments(1)
    moments.add(np.zeros(values.size, np.int64), values.astype(np.float32))
    return moments.stats(0)


def _rate(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 6) if x.size else None


def compute_statistics(
    stays: pa.Table,
    events: EventStream,
    manifest: dict,
    embeddings: dict[str, pa.Table] | None = None,
) -> dict:
    """Derived manifest fields: norm (train split only), counts, label_rates, missingness, from
    the stays and the summary `events` kept while they streamed past.

    Embedding modalities get counts and missingness but no norm: the model's embedding encoder
    layer-normalises each vector, so no per-dimension statistics are needed."""
    split = np.asarray(stays.column("split").to_pylist(), dtype=object)
    split_masks = {s: split == s for s in SPLITS}
    train = split_masks["train"]
    n = stays.num_rows

    norm: dict[str, dict] = {}
    missingness: dict[str, dict] = {"modality": {}, "variable": {}}
    counts: dict = {
        "stays": n,
        "events": events.rows,
        "splits": {s: int(m.sum()) for s, m in split_masks.items()},
        "events_per_modality": {},
        "stays_with_modality": {},
    }
    series_index = {m["name"]: k for k, m in enumerate(events.series)}
    for m in manifest["modalities"]:
        name = m["name"]
        norm[name] = {}
        missingness["variable"][name] = {}
        present = np.zeros(n, dtype=bool)
        if m["kind"] == "embedding":
            del norm[name], missingness["variable"][name]
            table = (embeddings or {})[name]
            pos = _np(pc.index_in(table.column("stay_id"), value_set=stays.column("stay_id")))
            present = np.bincount(pos.astype(np.int64), minlength=n) > 0
            counts["events_per_modality"][name] = table.num_rows
        elif m["kind"] == "static":
            for v in m["variables"]:
                col = stays.column(v)
                valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
                vals = _np(col)
                norm[name][v] = _stats(vals[valid & train])
                missingness["variable"][name][v] = _rate(~valid)
                present |= valid
        else:
            k = series_index[name]
            first = int(events.first_variable[k])
            counts["events_per_modality"][name] = int(
                events.per_variable[first : first + len(m["variables"])].sum()
            )
            for j, v in enumerate(m["variables"]):
                norm[name][v] = events.moments.stats(first + j)
                without = n - int(events.stays_per_variable[first + j])
                missingness["variable"][name][v] = round(without / n, 6) if n else None
            present = events.present[k]
        counts["stays_with_modality"][name] = int(present.sum())
        missingness["modality"][name] = {"all": _rate(~present)} | {
            s: _rate(~present[mask]) for s, mask in split_masks.items()
        }

    label_rates: dict[str, dict] = {}
    for t in manifest["tasks"]:
        col = stays.column(t["column"])
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        entry: dict = {"missing": int((~valid).sum())}
        if t["kind"] in ("binary", "regression"):
            vals = _np(col).astype(np.float64)
            key = "positive_rate" if t["kind"] == "binary" else "mean"
            entry[key] = {"all": _rate(vals[valid])} | {
                s: _rate(vals[valid & mask]) for s, mask in split_masks.items()
            }
        elif t["kind"] == "multiclass":
            vals = _np(col).astype(np.int64)[valid]
            entry["class_rates"] = [_rate(vals == c) for c in range(t["num_outputs"])]
        else:
            rows = np.array([r for r in col.to_pylist() if r is not None], dtype=np.float64)
            entry["positive_rates"] = rows.mean(0).round(6).tolist() if rows.size else None
        label_rates[t["name"]] = entry
    return {"norm": norm, "counts": counts, "label_rates": label_rates, "missingness": missingness}


# ----------------------------------------------------------------------------- writing


def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    return data


def _normalise_events(events: pa.Table) -> pa.Table:
    """Store modality/variable as dictionaries and stay_id as plain string (lossless)."""
    cols = {}
    for field in EVENTS_SCHEMA:
        col = events.column(field.name)
        if pa.types.is_dictionary(field.type):
            if not pa.types.is_dictionary(col.type):
                col = pc.dictionary_encode(col)
            col = col.cast(field.type)
        elif field.name == "stay_id":
            col = col.cast(pa.string())
        cols[field.name] = col
    return pa.table(cols, schema=EVENTS_SCHEMA)


def _normalise_stays(stays: pa.Table, manifest: dict) -> pa.Table:
    schema = _stays_schema_of(stays, manifest)
    cols = {}
    for field in schema:
        col = stays.column(field.name)
        if field.name in ("stay_id", "split", SUBJECT_COLUMN):
            col = col.cast(pa.string())
        elif pa.types.is_list(field.type) and not pa.types.is_list(col.type):
            col = col.cast(field.type)
        cols[field.name] = col
    return pa.table(cols, schema=schema)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _RowGroupWriter:
    """Appends event batches to a ParquetWriter in row groups of exactly EVENTS_ROW_GROUP rows
    (the last one smaller), so a file written batch by batch has the row groups, and for
    batches sharing their dictionaries the bytes, of one written from the whole table."""

    def __init__(self, writer: pq.ParquetWriter):
        self.writer, self.pending, self.size, self.groups = writer, [], 0, 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.size += table.num_rows
        while self.size >= EVENTS_ROW_GROUP:
            self._write(EVENTS_ROW_GROUP)

    def close(self) -> None:
        if self.size or not self.groups:  # no events: one empty row group, as write_table
            self._write(self.size)

    def _write(self, rows: int) -> None:
        table = pa.concat_tables(self.pending) if self.pending else EVENTS_SCHEMA.empty_table()
        # one dictionary per column of a row group (index arrays rewritten, values not copied)
        self.writer.write_table(table.slice(0, rows).unify_dictionaries())
        self.groups += 1
        rest = table.slice(rows)
        self.pending, self.size = ([rest] if rest.num_rows else []), rest.num_rows


def write_flexi(
    directory: str | os.PathLike,
    stays: pa.Table | pd.DataFrame,
    events: pa.Table | pd.DataFrame | Iterable[pa.Table | pa.RecordBatch],
    manifest: dict,
    *,
    names: tuple[str, str] = ("stays (to write)", "events (to write)"),
    embeddings: dict[str, pa.Table | pd.DataFrame] | None = None,
    embedding_names: dict[str, str] | None = None,
) -> dict:
    """Cast losslessly, validate, complete the manifest (train-only norm etc.) and write
    atomically; returns the manifest.

    `events` is a table (any row order) or a stream of tables/record batches that keeps each
    stay's rows together (`EventsNotGrouped` otherwise): a stream is checked, summarised and
    written batch by batch, so no more than a batch and one stay's events are in memory.
    `embeddings` holds one table (stay_id, time_h, vector) per embedding modality of the
    manifest. `names` and `embedding_names` label the tables in error messages (e.g. the user's
    file paths). Output goes to a temp dir beside the target, which then replaces the target by
    rename, so a failure at any point leaves either the old directory or nothing, never a
    partial one.
    """
    stays = _as_table(stays)
    manifest = json.loads(json.dumps(manifest))  # deep copy; also proves it is JSON-serialisable
    manifest["schema_version"] = SCHEMA_VERSION
    manifest.setdefault("source", "unknown")
    manifest.setdefault("source_hashes", {})
    check_manifest(manifest)
    stays, stays_casts = conform_types(stays, _stays_schema_of(stays, manifest), names[0])
    casts = {STAYS_FILE: stays_casts}
    embeddings = {m: _as_table(t) for m, t in (embeddings or {}).items()}
    labels = _embedding_labels(
        manifest,
        embeddings,
        {m: f"{embedding_file(m)} (to write)" for m in embeddings} | (embedding_names or {}),
    )
    widths = {m["name"]: m["width"] for m in embedding_modalities(manifest)}
    for name, table in embeddings.items():
        embeddings[name], casts[embedding_file(name)] = conform_vectors(
            table, widths[name], labels[name]
        )
    observed = _validate_stays_and_embeddings(
        stays, manifest, names[0], MANIFEST_FILE, embeddings, labels
    )
    stays = _normalise_stays(stays, manifest)
    embeddings = {
        m: pa.table({f.name: t.column(f.name) for f in embedding_schema(widths[m])}).cast(
            embedding_schema(widths[m])
        )
        for m, t in embeddings.items()
    }

    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like mkdir's
        stream = EventStream(stays, manifest, names[1], names[0])
        with pq.ParquetWriter(tmp / EVENTS_FILE, EVENTS_SCHEMA) as writer:
            out = _RowGroupWriter(writer)
            for batch in event_batches(events):
                out.add(_normalise_events(stream.add(batch, conform=True)))
            out.close()
        stream.finish(observed)
        casts[EVENTS_FILE] = stream.casts
        if any(casts.values()):  # recorded only when made, so exact-typed sources are unchanged
            manifest["casts"] = {k: v for k, v in casts.items() if v}
        manifest.update(compute_statistics(stays, stream, manifest, embeddings))
        pq.write_table(stays, tmp / STAYS_FILE)
        files = [STAYS_FILE, EVENTS_FILE]
        for name, table in embeddings.items():
            (tmp / embedding_file(name)).parent.mkdir(exist_ok=True)
            rows = vector_row_group_rows(table.schema.field("vector").type.list_size)
            pq.write_table(table, tmp / embedding_file(name), row_group_size=rows)
            files.append(embedding_file(name))
        manifest["files"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        getattr(events, "close", lambda: None)()  # a generator's clean-up (e.g. spill files)
    return manifest


def _replace_dir(src: Path, target: Path) -> None:
    """Swap `src` into place of `target` with renames (os.replace cannot overwrite a full dir)."""
    if not target.exists():
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def norm_arrays(manifest: dict, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 vectors in the modality's variable order."""
    m = next(x for x in manifest["modalities"] if x["name"] == modality)
    stats = manifest["norm"][modality]
    mean = np.array([stats[v]["mean"] for v in m["variables"]], dtype=np.float32)
    std = np.array([stats[v]["std"] or 1.0 for v in m["variables"]], dtype=np.float32)
    std[~np.isfinite(std) | (std <= 0)] = 1.0
    mean[~np.isfinite(mean)] = 0.0
    return mean, std


# ----------------------------------------------------------------------------- splits


def assign_splits(
    df: pd.DataFrame,
    fractions: tuple[float, float, float] | list[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify_col: str | None = None,
    group_col: str | None = None,
) -> np.ndarray:
    """Seeded train/val/test assignment, stratified on `stratify_col` (null is its own stratum).

    Returns an array of split names aligned with `df`'s rows. Reusable so a benchmark can re-split
    the same stays (e.g. 80/10/10 over 5 seeds) without re-reading the raw data.
    With `group_col` (e.g. subject_id) whole groups are assigned, so no group is in two splits:
    each group is stratified on its first row's stratum and the fractions count groups. With one
    row per group this is exactly the row-level assignment.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    n = len(df)
    if stratify_col is None:
        strata = np.zeros(n, dtype=np.int64)
    else:
        key = pd.Series(df[stratify_col]).reset_index(drop=True)
        strata = pd.factorize(key.astype("string").fillna("<null>"), sort=True)[0]
    group = np.arange(n)
    if group_col is not None:  # groups in order of first appearance, each with its first stratum
        key = pd.Series(df[group_col]).reset_index(drop=True).astype("string").fillna("<null>")
        group = pd.factorize(key, sort=False)[0]
        _, first_row = np.unique(group, return_index=True)
        strata = strata[first_row]
    rng = np.random.default_rng(seed)
    out = np.empty(len(strata), dtype=object)
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        bounds = np.round(np.cumsum(fr) * len(idx)).astype(int)
        for name, lo, hi in zip(SPLITS, np.r_[0, bounds[:-1]], bounds, strict=True):
            out[idx[lo:hi]] = name
    return out[group]
