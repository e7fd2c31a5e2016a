"""MEDS (Medical Event Data Standard) dataset + label file -> FlexiModal tables.

A MEDS dataset directory holds `data/**/*.parquet` shards of events (`subject_id` int64, `time`
timestamp, null for static events, `code` string, `numeric_value` float32, nullable; extra
columns such as `text_value` are ignored) and `metadata/` (`dataset.json`, `codes.parquet`,
`subject_splits.parquet` with `subject_id, split` in train / tuning / held_out). A MEDS label file
(or a directory of them) has `subject_id, prediction_time` and a value column per task kind:
`boolean_value` (binary), `float_value` (regression), `integer_value` (multiclass) or, for a
multilabel task, one row per (subject, prediction_time, label) with the label's name in
`categorical_value` and its value in `boolean_value`.

Each labelled (subject_id, prediction_time) becomes one stay, `stay_id` "<subject_id>@<ISO time>"
(`stay_id_to_meds` reverses it), `subject_id` kept so splits are per subject. Rules (docs/
FLEXIMODAL.md, "MEDS input"):
- a code belongs to the modality of its longest matching prefix in `modalities`; its events
  inside the observation window [prediction_time - window_h, prediction_time] (MEDS: a model may
  use data up to and including the prediction time) become series values, time in hours from the
  window start. Events outside the window are dropped; those with a null numeric_value are
  skipped (counted): a series needs a number. Repeats of a code at one time are averaged.
- static: events with a null time, and codes with a `static_prefixes` prefix at or before the
  prediction time (the latest wins). A static event without a numeric_value is an indicator
  (e.g. GENDER//F): 1 when present, 0 for stays without it.
- codes matching nothing are counted (or an error with unmatched_codes: error).
- a stay with no events in its window and no static value is dropped and counted.
- MEDS tuning is our val split, held_out our test split; without subject_splits.parquet subjects
  are split by `assign_splits`, grouped by subject.
Shards are streamed in record batches of the needed columns, keeping only the rows of labelled
subjects; memory holds the output events, not the dataset. Bad input is a FlexiModalError naming
file, row (0-based within that file), column and value.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusemoe.data.flexi import (
    SUBJECT_COLUMN,
    FlexiModalError,
    assign_splits,
    cast_losslessly,
    sha256_file,
)

SPLIT_NAMES = {"train": "train", "tuning": "val", "held_out": "test"}  # MEDS -> FlexiModal
LABEL_VALUE = {
    "binary": "boolean_value",
    "regression": "float_value",
    "multiclass": "integer_value",
    "multilabel": "boolean_value",
}
STATIC_MODALITY = "static"
BATCH_ROWS = 1 << 16  # rows per record batch: bounds the per-batch working memory
_US_PER_H = 3.6e9
_NO_TIME = np.iinfo(np.int64).min  # sorts first: a timestamped static value wins over a null one


# The MEDS data and label schemas as written by MEDS ETLs (meds.schema); the reader also accepts
# the lossless variants it checks for, this is what the synthetic writer and the tests produce.
DATA_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
        ("text_value", pa.string()),
    ]
)
LABEL_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("prediction_time", pa.timestamp("us")),
        ("boolean_value", pa.bool_()),
        ("integer_value", pa.int64()),
        ("float_value", pa.float64()),
        ("categorical_value", pa.string()),
    ]
)


def _is_timestamp(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


REQUIRED_DATA = {
    "subject_id": (pa.types.is_int64, "int64"),
    "time": (_is_timestamp, "timestamp"),
    "code": (_is_string, "string"),
    "numeric_value": (pa.types.is_floating, "float32"),
}


def _check_schema(schema: pa.Schema, required: dict, file: Path) -> None:
    for name, (ok, expected) in required.items():
        if name not in schema.names:
            raise FlexiModalError(file, "required MEDS column is missing", column=name)
        if not ok(schema.field(name).type):
            raise FlexiModalError(
                file, f"wrong type {schema.field(name).type}, expected {expected}", column=name
            )


def _read(file: Path) -> pa.Table:
    try:
        return pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise FlexiModalError(file, f"not a readable Parquet file ({e})") from None


def _micros(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds (null -> _NO_TIME)."""
    us = pc.cast(col, pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
    return us.fill_null(_NO_TIME).to_numpy(zero_copy_only=False)


def _iso(us: int) -> str:
    return pd.Timestamp(int(us), unit="us").isoformat()


# ----------------------------------------------------------------------------- labels, splits


def _parquet_files(path: Path, what: str) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FlexiModalError(path, f"no {what} Parquet file found")
    return files


def read_labels(path: str | os.PathLike, cfg: dict) -> tuple[pd.DataFrame, list[str]]:
    """One row per stay: subject_id, prediction_time (us), label (int / float / list), file and
    row of its (first) label line; plus the label names of a multilabel task."""
    kind = cfg["task_kind"]
    value = LABEL_VALUE[kind]
    required = {
        "subject_id": REQUIRED_DATA["subject_id"],
        "prediction_time": (_is_timestamp, "timestamp"),
        value: {
            "boolean_value": (pa.types.is_boolean, "bool"),
            "float_value": (pa.types.is_floating, "float64"),
            "integer_value": (pa.types.is_integer, "int64"),
        }[value],
    }
    if kind == "multilabel":
        required["categorical_value"] = (_is_string, "string")
    parts = []
    for f in _parquet_files(Path(path), "label"):
        t = _read(f)
        _check_schema(t.schema, required, f)
        for col in ["subject_id", "prediction_time", *required]:
            if t.column(col).null_count:
                row = _first(pc.is_null(t.column(col)))
                raise FlexiModalError(f, "missing (null) value", row=row, column=col)
        df = pd.DataFrame(
            {
                "subject_id": t.column("subject_id").to_numpy(),
                "prediction_time": _micros(t.column("prediction_time")),
                "value": t.column(value).to_numpy(zero_copy_only=False),
                "name": t.column("categorical_value").to_pandas() if kind == "multilabel" else "",
                "file": str(f),
                "row": np.arange(t.num_rows),
            }
        )
        if kind == "regression" and not np.isfinite(df["value"]).all():
            i = int(np.flatnonzero(~np.isfinite(df["value"]))[0])
            raise FlexiModalError(
                f, f"label {df['value'][i]} is not finite", row=i, column="float_value"
            )
        parts.append(df)
    labels = pd.concat(parts, ignore_index=True)
    key = ["subject_id", "prediction_time", "name"]
    dup = labels.duplicated(key).to_numpy()
    if dup.any():
        r = labels.iloc[_first(dup)]
        label = f" label '{r['name']}'" if kind == "multilabel" else ""
        raise FlexiModalError(
            r["file"],
            f"duplicate label for subject {r['subject_id']} at {_iso(r['prediction_time'])}{label}",
            row=int(r["row"]),
            column="prediction_time",
        )
    names: list[str] = []
    if kind == "multilabel":
        names = list(cfg.get("classes") or sorted(labels["name"].unique()))
        unknown = ~labels["name"].isin(names).to_numpy()
        if unknown.any():
            r = labels.iloc[_first(unknown)]
            raise FlexiModalError(
                r["file"],
                f"label '{r['name']}' is not in data.meds.classes {names}",
                row=int(r["row"]),
                column="categorical_value",
            )
        wide = labels.pivot(index=["subject_id", "prediction_time"], columns="name", values="value")
        wide = wide.reindex(columns=names)
        incomplete = wide.isna().any(axis=1).to_numpy()
        if incomplete.any():
            sid, pt = wide.index[_first(incomplete)]
            missing = [n for n in names if pd.isna(wide.iloc[_first(incomplete)][n])]
            first = labels[(labels.subject_id == sid) & (labels.prediction_time == pt)].iloc[0]
            raise FlexiModalError(
                first["file"],
                f"subject {sid} at {_iso(pt)} has no row for label(s) {missing[:3]} "
                f"(a multilabel stay needs a boolean_value for each of {len(names)} labels)",
                row=int(first["row"]),
                column="categorical_value",
            )
        rows = labels.drop_duplicates(["subject_id", "prediction_time"]).set_index(
            ["subject_id", "prediction_time"]
        )
        rows = rows.loc[wide.index].reset_index()
        rows["value"] = [list(v) for v in wide.to_numpy(dtype=np.int8)]
        labels = rows
    elif kind == "multiclass":
        n = int(cfg["num_classes"] or 0)
        bad = ((labels["value"] < 0) | (labels["value"] >= n)).to_numpy()
        if bad.any():
            r = labels.iloc[_first(bad)]
            raise FlexiModalError(
                r["file"],
                f"integer_value {r['value']} is outside 0..{n - 1} (data.meds.num_classes {n})",
                row=int(r["row"]),
                column="integer_value",
            )
    return labels.drop(columns="name").reset_index(drop=True), names


def _first(mask) -> int:
    if isinstance(mask, pa.ChunkedArray | pa.Array):
        mask = mask.to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(np.asarray(mask))[0])


def read_subject_splits(path: Path) -> dict[int, str] | None:
    """subject_id -> our split name, or None when the file does not exist."""
    if not path.is_file():
        return None
    t = _read(path)
    _check_schema(
        t.schema, {"subject_id": REQUIRED_DATA["subject_id"], "split": (_is_string, "string")}, path
    )
    for col in ("subject_id", "split"):
        if t.column(col).null_count:
            raise FlexiModalError(
                path, "missing (null) value", row=_first(pc.is_null(t.column(col))), column=col
            )
    sid = t.column("subject_id").to_pandas()
    split = t.column("split").to_pandas().astype(str)
    bad = ~split.isin(list(SPLIT_NAMES)).to_numpy()
    if bad.any():
        i = _first(bad)
        raise FlexiModalError(
            path,
            f"split '{split[i]}' is not a MEDS split {list(SPLIT_NAMES)}",
            row=i,
            column="split",
        )
    dup = sid.duplicated().to_numpy()
    if dup.any():
        i = _first(dup)
        j = _first((sid == sid[i]).to_numpy())
        raise FlexiModalError(
            path,
            f"subject {sid[i]} is listed again (first at row {j}, split '{split[j]}'; "
            f"here '{split[i]}'): a subject belongs to one split",
            row=i,
            column="subject_id",
        )
    return dict(zip(sid.tolist(), split.map(SPLIT_NAMES).tolist(), strict=True))


# ----------------------------------------------------------------------------- events


class _Codes:
    """The variables met so far: series codes (with their modality) and static codes."""

    def __init__(self, modalities: dict[str, str], static_prefixes: list[str]):
        self.prefixes = sorted(modalities.items(), key=lambda kv: -len(kv[0]))  # longest first
        self.static_prefixes = tuple(static_prefixes)
        self.modality_names = list(dict.fromkeys(modalities.values()))
        self.variables: dict[str, int] = {}  # series code -> index
        self.var_modality: list[int] = []  # series variable index -> modality index
        self.static: dict[str, int] = {}  # static code -> index

    def lookup(self, codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per code: its series variable index (-1: no modality, or a static code) and whether
        it is a static code by prefix."""
        series = np.full(len(codes), -1, dtype=np.int64)
        static = np.zeros(len(codes), dtype=bool)
        for i, code in enumerate(codes):
            static[i] = code.startswith(self.static_prefixes)
            mod = next((m for p, m in self.prefixes if code.startswith(p)), None)
            if mod is None or static[i]:
                continue
            if code not in self.variables:
                self.variables[code] = len(self.variables)
                self.var_modality.append(self.modality_names.index(mod))
            series[i] = self.variables[code]
        return series, static

    def static_index(self, code: str) -> int:
        return self.static.setdefault(code, len(self.static))


def read_meds(
    cfg: dict, *, split: list[float] | tuple[float, ...] = (0.7, 0.15, 0.15), seed: int = 0
) -> tuple[pd.DataFrame, pa.Table, dict]:
    """FlexiModal (stays, events, manifest) from the `data.meds` params (see module docstring)."""
    root = Path(cfg["dataset_dir"])
    shards = sorted((root / "data").rglob("*.parquet"))
    if not shards:
        raise FlexiModalError(root / "data", "no MEDS data shards (*.parquet) found")
    meta = _dataset_metadata(root / "metadata" / "dataset.json")
    labels, label_names = read_labels(cfg["labels"], cfg)
    splits = read_subject_splits(root / "metadata" / "subject_splits.parquet")
    if splits is not None:
        known = labels["subject_id"].isin(list(splits)).to_numpy()
        if not known.all():
            r = labels.iloc[_first(~known)]
            raise FlexiModalError(
                r["file"],
                f"label for subject {r['subject_id']}, which is not in subject_splits.parquet",
                row=int(r["row"]),
                column="subject_id",
            )

    window_us = int(round(float(cfg["window_h"]) * _US_PER_H))
    subjects = np.unique(labels["subject_id"].to_numpy())  # labelled subjects, sorted
    n_stays = len(labels)
    stay_subject_pos = np.searchsorted(subjects, labels["subject_id"].to_numpy())
    pt = labels["prediction_time"].to_numpy()
    # `order` lists the stays grouped by subject: subject k's stays are order[run_start[k]:][:run_len[k]].
    order = np.argsort(stay_subject_pos, kind="stable")
    run_start = np.searchsorted(stay_subject_pos[order], np.arange(len(subjects)))
    run_len = np.bincount(stay_subject_pos, minlength=len(subjects))
    first_t = np.full(len(subjects), np.iinfo(np.int64).max)
    last_t = np.full(len(subjects), np.iinfo(np.int64).min)
    seen_data = np.zeros(len(subjects), dtype=bool)
    codes = _Codes(cfg["modalities"], cfg["static_prefixes"])
    counts = {"events_read": 0, "events_kept": 0, "null_numeric_value": 0, "outside_window": 0}
    unmatched: dict[str, int] = {}
    data_subjects: list[np.ndarray] = []
    ev: dict[str, list[np.ndarray]] = {"stay": [], "var": [], "t": [], "value": []}
    st: dict[str, list[np.ndarray]] = {"stay": [], "var": [], "t": [], "value": [], "flag": []}
    columns = list(REQUIRED_DATA)
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except (pa.ArrowException, OSError) as e:
            raise FlexiModalError(shard, f"not a readable Parquet file ({e})") from None
        _check_schema(pf.schema_arrow, REQUIRED_DATA, shard)
        offset = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            n = batch.num_rows
            rows = np.arange(offset, offset + n)
            offset += n
            counts["events_read"] += n
            sid_col = batch.column("subject_id")
            for col in ("subject_id", "code"):
                if batch.column(col).null_count:
                    i = _first(pc.is_null(batch.column(col)))
                    raise FlexiModalError(
                        shard, "missing (null) value", row=int(rows[i]), column=col
                    )
            sid = sid_col.to_numpy()
            if splits is not None:
                data_subjects.append(np.unique(sid))
            pos = np.searchsorted(subjects, sid)
            pos[pos >= len(subjects)] = 0
            keep = subjects[pos] == sid if len(subjects) else np.zeros(n, bool)
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            pos, rows = pos[idx], rows[idx]
            t = _micros(batch.column("time").take(pa.array(idx)))
            code_arr = pc.dictionary_encode(batch.column("code").take(pa.array(idx)))
            dictionary = code_arr.dictionary.to_pylist()
            series_of_code, static_of_code = codes.lookup(dictionary)
            ci = code_arr.indices.to_numpy(zero_copy_only=False)
            num = batch.column("numeric_value").take(pa.array(idx))
            has_num = pc.is_valid(num).to_numpy(zero_copy_only=False)
            value = num.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
            timed = t != _NO_TIME
            seen_data[pos] = True
            np.minimum.at(first_t, pos[timed], t[timed])
            np.maximum.at(last_t, pos[timed], t[timed])
            svar = series_of_code[ci]
            static_row = ~timed | static_of_code[ci]
            series_row = (svar >= 0) & ~static_row
            lost = ~series_row & ~static_row
            for c, k in zip(*np.unique(ci[lost], return_counts=True), strict=True):
                unmatched[dictionary[c]] = unmatched.get(dictionary[c], 0) + int(k)
            if lost.any() and cfg["unmatched_codes"] == "error":
                i = _first(lost)
                raise FlexiModalError(
                    shard,
                    f"code '{dictionary[ci[i]]}' matches no prefix of data.meds.modalities or "
                    "static_prefixes (unmatched_codes: error)",
                    row=int(rows[i]),
                    column="code",
                )
            # Expand each row to the stays of its subject (a subject may have several labels).
            r = np.flatnonzero(series_row | static_row)
            rep = run_len[pos[r]]
            src = np.repeat(r, rep)
            within = np.arange(len(src)) - np.repeat(np.cumsum(rep) - rep, rep)
            stay = order[run_start[pos[src]] + within]
            t_s, pt_s = t[src], pt[stay]
            series = series_row[src]
            usable = np.where(series, (t_s >= pt_s - window_us) & (t_s <= pt_s), t_s <= pt_s)
            counts["outside_window"] += int((series & ~usable).sum())
            null = series & usable & ~has_num[src]
            counts["null_numeric_value"] += int(null.sum())
            use = usable & ~null
            bad = use & ~np.isfinite(value[src])
            if bad.any():
                i = src[_first(bad)]
                raise FlexiModalError(
                    shard,
                    f"numeric_value {value[i]} is not finite (code '{dictionary[ci[i]]}')",
                    row=int(rows[i]),
                    column="numeric_value",
                )
            sel = use & series
            ev["stay"].append(stay[sel].astype(np.int32))
            ev["var"].append(svar[src[sel]].astype(np.int32))
            ev["t"].append(((t_s[sel] - (pt_s[sel] - window_us)) / _US_PER_H).astype(np.float32))
            ev["value"].append(value[src[sel]])
            sel = use & ~series
            if sel.any():
                names = [dictionary[c] for c in ci[src[sel]]]
                st["stay"].append(stay[sel])
                st["var"].append(np.array([codes.static_index(c) for c in names]))
                st["t"].append(t_s[sel])
                st["value"].append(np.where(has_num[src[sel]], value[src[sel]], 1.0))
                st["flag"].append(~has_num[src[sel]])

    _check_coverage(
        labels,
        subjects,
        seen_data,
        first_t,
        last_t,
        pt,
        stay_subject_pos,
        splits,
        data_subjects,
        root,
    )
    events = _mean_of_repeats({k: np.concatenate(v) if v else np.zeros(0) for k, v in ev.items()})
    counts["events_kept"] = len(events)
    statics, static_names = _static_values(st, codes, n_stays)

    has_any = np.bincount(events["stay"], minlength=n_stays) > 0
    if st["stay"]:  # an observed static value (not an indicator's filled-in 0)
        has_any |= np.bincount(np.concatenate(st["stay"]), minlength=n_stays) > 0
    counts["stays_dropped_empty"] = int((~has_any).sum())
    counts["unmatched_code_events"] = int(sum(unmatched.values()))
    counts["unmatched_codes"] = dict(sorted(unmatched.items(), key=lambda kv: -kv[1])[:20])
    new_index = np.cumsum(has_any) - 1

    stays = pd.DataFrame(
        {
            "stay_id": [
                f"{s}@{_iso(p)}"
                for s, p in zip(labels["subject_id"], labels["prediction_time"], strict=True)
            ],
            SUBJECT_COLUMN: labels["subject_id"].astype(str),
        }
    )
    task = cfg["task"]
    kind = cfg["task_kind"]
    if kind == "multilabel":
        stays[task] = labels["value"]
    elif kind == "regression":
        stays[task] = labels["value"].astype(np.float32)
    else:
        stays[task] = labels["value"].astype(np.int8 if kind == "binary" else np.int16)
    if statics is not None:
        stays = pd.concat([stays, statics], axis=1)
    if splits is not None:
        split_col = labels["subject_id"].map(splits).to_numpy()
        split_info: dict = {"from": "metadata/subject_splits.parquet", "map": SPLIT_NAMES}
    else:
        strat = task if kind == "binary" else None
        split_col = assign_splits(stays, split, seed, strat, group_col=SUBJECT_COLUMN)
        split_info = {"fractions": list(split), "seed": seed, "stratify": [strat] if strat else []}
        split_info["grouped_by"] = SUBJECT_COLUMN
    stays.insert(1, "split", split_col)
    stays = stays[has_any].reset_index(drop=True)

    events = events[has_any[events["stay"].to_numpy()]]
    var_names = list(codes.variables)
    var_mod = np.asarray(codes.var_modality, dtype=np.int32)
    used_vars = np.unique(events["var"].to_numpy())
    modalities = []
    for k, name in enumerate(codes.modality_names):
        vs = [var_names[v] for v in used_vars if var_mod[v] == k]
        if vs:
            modalities.append({"name": name, "kind": "series", "variables": sorted(vs)})
    if static_names:
        modalities.append({"name": STATIC_MODALITY, "kind": "static", "variables": static_names})
    if not modalities:
        raise FlexiModalError(
            root / "data",
            "no event of a labelled subject matches data.meds.modalities in its window",
        )
    stay_ids = pa.array(stays["stay_id"].to_numpy(), pa.string())
    var_idx = events["var"].to_numpy()
    table = pa.table(
        {
            "stay_id": stay_ids.take(pa.array(new_index[events["stay"].to_numpy()])),
            "modality": pa.DictionaryArray.from_arrays(
                pa.array(var_mod[var_idx]), pa.array(codes.modality_names)
            ),
            "variable": pa.DictionaryArray.from_arrays(
                pa.array(var_idx.astype(np.int32)), pa.array(var_names, pa.string())
            ),
            "time_h": pa.array(events["time_h"].to_numpy(), pa.float32()),
            "value": cast_losslessly(
                pa.array(events["value"].to_numpy()), pa.float32(), "MEDS events", "numeric_value"
            ),
        }
    )
    task_entry = {"name": task, "kind": kind, "num_outputs": 1}
    if kind == "multiclass":
        task_entry["num_outputs"] = int(cfg["num_classes"])
    if kind == "multilabel":
        task_entry["num_outputs"] = len(label_names)
        task_entry["labels"] = label_names
    label_files = _parquet_files(Path(cfg["labels"]), "label")
    manifest = {
        "source": f"meds:{root}",
        "modalities": modalities,
        "tasks": [task_entry],
        "split": split_info,
        "meds": {
            "dataset": meta,
            "window_h": float(cfg["window_h"]),
            "stay_id": "<subject_id>@<prediction_time, ISO 8601>",
            "counts": counts,
        },
        "source_hashes": {str(f): sha256_file(f) for f in [*shards, *label_files]},
    }
    return stays, table, manifest


def _mean_of_repeats(ev: dict[str, np.ndarray]) -> pd.DataFrame:
    """Events sorted by (stay, variable, time), values of one (stay, variable, time) averaged."""
    stay, var = ev["stay"].astype(np.int32), ev["var"].astype(np.int32)
    time, value = ev["t"].astype(np.float32), ev["value"]
    order = np.lexsort((time, var, stay))
    stay, var, time, value = stay[order], var[order], time[order], value[order]
    new = np.ones(len(stay), dtype=bool)
    new[1:] = (stay[1:] != stay[:-1]) | (var[1:] != var[:-1]) | (time[1:] != time[:-1])
    starts = np.flatnonzero(new)
    mean = (
        np.add.reduceat(value, starts) / np.diff(np.r_[starts, len(value)])
        if len(starts)
        else value
    )
    return pd.DataFrame(
        {"stay": stay[starts], "var": var[starts], "time_h": time[starts], "value": mean}
    )


def _dataset_metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexiModalError(path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FlexiModalError(path, "must be a JSON object")
    keys = ("dataset_name", "dataset_version", "etl_name", "etl_version", "meds_version")
    return {k: str(meta[k]) for k in keys if k in meta}


def _check_coverage(
    labels, subjects, seen_data, first_t, last_t, pt, stay_pos, splits, data_subjects, root: Path
) -> None:
    """Labels need data around their prediction time; split subjects need data."""
    no_data = ~seen_data[stay_pos]
    if no_data.any():
        r = labels.iloc[_first(no_data)]
        raise FlexiModalError(
            r["file"],
            f"label for subject {r['subject_id']}, who has no events in {root / 'data'}",
            row=int(r["row"]),
            column="subject_id",
        )
    lo, hi = first_t[stay_pos], last_t[stay_pos]
    outside = (pt < lo) | (pt > hi)
    # A subject with static (untimed) events only has no time range: any prediction time fits.
    outside &= lo <= hi
    if outside.any():
        i = _first(outside)
        r = labels.iloc[i]
        raise FlexiModalError(
            r["file"],
            f"prediction_time {_iso(pt[i])} of subject {r['subject_id']} is outside the "
            f"subject's data ({_iso(lo[i])} .. {_iso(hi[i])})",
            row=int(r["row"]),
            column="prediction_time",
        )
    if splits is not None:
        present = np.unique(np.concatenate(data_subjects)) if data_subjects else np.zeros(0)
        split_ids = np.fromiter(splits, dtype=np.int64, count=len(splits))
        missing = ~np.isin(split_ids, present)
        if missing.any():
            i = _first(missing)
            raise FlexiModalError(
                root / "metadata" / "subject_splits.parquet",
                f"subject {split_ids[i]} has a split but no events in {root / 'data'}",
                row=i,
                column="subject_id",
            )
        unknown = ~np.isin(present, split_ids)
        if unknown.any():
            raise FlexiModalError(
                root / "metadata" / "subject_splits.parquet",
                f"subject {present[_first(unknown)]} has events in {root / 'data'} but no split",
                column="subject_id",
            )


def _static_values(st: dict, codes: _Codes, n_stays: int) -> tuple[pd.DataFrame | None, list]:
    """One float32 column per static code: its latest value at or before the prediction time;
    indicator codes (no numeric_value) are 1 where present and 0 elsewhere."""
    if not st["stay"]:
        return None, []
    df = pd.DataFrame({k: np.concatenate(v) for k, v in st.items()})
    df = df.sort_values(["stay", "var", "t"], kind="stable").drop_duplicates(
        ["stay", "var"], keep="last"
    )
    names = list(codes.static)
    wide = np.full((n_stays, len(names)), np.nan, dtype=np.float32)
    wide[df["stay"].to_numpy(), df["var"].to_numpy()] = df["value"].to_numpy()
    indicator = np.zeros(len(names), dtype=bool)
    flag_all = df.groupby("var")["flag"].all()
    indicator[flag_all.index.to_numpy()] = flag_all.to_numpy()
    wide[:, indicator] = np.nan_to_num(wide[:, indicator], nan=0.0)
    order = sorted(range(len(names)), key=lambda k: names[k])
    out = pd.DataFrame({names[k]: pd.array(wide[:, k], dtype="Float32") for k in order})
    return out, [names[k] for k in order]


# ----------------------------------------------------------------------------- predictions

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64()),
        pa.field("prediction_time", pa.timestamp("us")),
        pa.field("boolean_value", pa.bool_()),
        pa.field("predicted_boolean_value", pa.bool_()),
        pa.field("predicted_boolean_probability", pa.float32()),
    ]
)


def stay_id_to_meds(stay_id: str) -> tuple[int, datetime]:
    """(subject_id, prediction_time) of a stay made by read_meds; ValueError otherwise."""
    subject, sep, when = str(stay_id).partition("@")
    if not sep:
        raise ValueError(f"stay_id '{stay_id}' is not '<subject_id>@<prediction_time>'")
    try:
        return int(subject), datetime.fromisoformat(when)
    except ValueError:
        raise ValueError(f"stay_id '{stay_id}' is not '<subject_id>@<prediction_time>'") from None


def meds_predictions(
    stay_ids, probability: np.ndarray, labels: np.ndarray | None = None, threshold: float = 0.5
) -> pa.Table:
    """A binary task's predictions in the MEDS prediction schema (meds-evaluation's input):
    predicted_boolean_value = probability >= threshold; boolean_value where the label is known
    (NaN label = unknown -> null). Raises ValueError on a non-finite probability."""
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    if not np.isfinite(p).all():
        i = _first(~np.isfinite(p))
        raise ValueError(f"stay '{list(stay_ids)[i]}': probability {p[i]} is not finite")
    keys = [stay_id_to_meds(s) for s in stay_ids]
    known = None
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        known = pa.array(y == 1, mask=~np.isfinite(y))
    return pa.table(
        {
            "subject_id": pa.array([k[0] for k in keys], pa.int64()),
            "prediction_time": pa.array([k[1] for k in keys], pa.timestamp("us")),
            "boolean_value": known if known is not None else pa.nulls(len(p), pa.bool_()),
            "predicted_boolean_value": pa.array(p >= threshold),
            "predicted_boolean_probability": pa.array(p, pa.float32()),
        },
        schema=PREDICTION_SCHEMA,
    )


# ----------------------------------------------------------------------------- synthetic MEDS

SYNTHETIC_CODES = [f"LAB//{c}" for c in "ABCDE"] + ["VITAL//HR", "VITAL//SBP", "STATIC//WEIGHT"]


def write_synthetic_meds(
    root: str | os.PathLike,
    labels_file: str | os.PathLike,
    *,
    num_subjects: int = 200,
    events_per_subject: int = 100,
    num_shards: int = 2,
    num_labels: int = 1,
    seed: int = 0,
) -> dict:
    """A small MEDS dataset with a learnable label, for tests and benchmarks/meds_prepare.py.

    Each subject has a risk z ~ N(0, 1); LAB//A values are N(z, 1), other codes noise, over the
    96 h after a random start. Every subject is labelled at start + 48 h, every fourth also at
    start + 72 h (two stays of one subject). Label k = (w_k z + noise > 0); num_labels 1 writes a
    binary boolean_value file, more a multilabel file (categorical_value "PHENO//k"). Also:
    GENDER//F with a null time (a static indicator), MEDS_BIRTH and HOSPITAL_DISCHARGE (codes of
    no modality), and one
    LAB//B in 50 without a numeric_value. Returns counts."""
    rng = np.random.default_rng(seed)
    root, labels_file = Path(root), Path(labels_file)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    n, e = num_subjects, events_per_subject
    sid = np.arange(1000, 1000 + n, dtype=np.int64)
    z = rng.normal(size=n)
    start = np.datetime64("2020-01-01T00:00:00", "us") + rng.integers(0, 365 * 24, n).astype(
        "timedelta64[h]"
    )
    subj = np.repeat(np.arange(n), e)
    offset_us = rng.integers(0, 96 * 3_600_000_000, n * e)
    code_idx = rng.integers(0, len(SYNTHETIC_CODES), n * e)
    value = rng.normal(size=n * e).astype(np.float32)
    is_a = code_idx == 0
    value[is_a] += z[subj[is_a]].astype(np.float32)
    time = start[subj] + offset_us.astype("timedelta64[us]")
    order = np.lexsort((time, subj))
    subj, time, code_idx, value = subj[order], time[order], code_idx[order], value[order]
    codes = np.asarray(SYNTHETIC_CODES, dtype=object)[code_idx]
    valid = ~((code_idx == 1) & (np.arange(n * e) % 50 == 0))
    # Per subject: MEDS_BIRTH and (half of them) GENDER//F with a null time, first in the subject.
    # and HOSPITAL_DISCHARGE (no modality either) at start + 96 h, after every prediction time.
    half = np.flatnonzero(np.arange(n) % 2 == 0)
    extra_subj = np.r_[np.arange(n), np.arange(n), half]
    extra_time = np.r_[
        start - np.timedelta64(40 * 365, "D"),
        start + np.timedelta64(96, "h"),
        np.full(len(half), "NaT", "M8[us]"),
    ]
    extra_code = np.r_[
        np.full(n, "MEDS_BIRTH", object),
        np.full(n, "HOSPITAL_DISCHARGE", object),
        np.full(len(half), "GENDER//F", object),
    ]
    all_subj = np.r_[subj, extra_subj]
    table = pd.DataFrame(
        {
            "subject_id": sid[all_subj],
            "time": np.r_[time, extra_time],
            "code": np.r_[codes, extra_code],
            "numeric_value": pd.arrays.FloatingArray(
                np.r_[value, np.zeros(len(extra_subj), np.float32)],
                mask=~np.r_[valid, np.zeros(len(extra_subj), bool)],
            ),
        }
    )
    table = table.sort_values(["subject_id", "time"], kind="stable", na_position="first")
    schema = DATA_SCHEMA
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    for k in range(num_shards):
        part = table[table["subject_id"].between(sid[bounds[k]], sid[bounds[k + 1] - 1])]
        t = pa.Table.from_pandas(part, preserve_index=False).append_column(
            "text_value", pa.nulls(len(part), pa.string())
        )
        pq.write_table(t.cast(schema), root / "data" / f"{k}.parquet")
    split = np.array(["train", "tuning", "held_out"], dtype=object)[
        np.searchsorted([0.7, 0.85], rng.permutation(n) / n, side="right")
    ]
    pq.write_table(
        pa.table({"subject_id": pa.array(sid), "split": pa.array(split.tolist())}),
        root / "metadata" / "subject_splits.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "code": SYNTHETIC_CODES + ["GENDER//F", "MEDS_BIRTH", "HOSPITAL_DISCHARGE"],
                "description": ["synthetic"] * (len(SYNTHETIC_CODES) + 3),
            }
        ),
        root / "metadata" / "codes.parquet",
    )
    (root / "metadata" / "dataset.json").write_text(
        json.dumps({"dataset_name": "synthetic", "meds_version": "0.3.3", "etl_name": "fusemoe"})
    )
    second = np.flatnonzero(np.arange(n) % 4 == 0)
    lab_subj = np.r_[np.arange(n), second]
    pt = np.r_[start + np.timedelta64(48, "h"), start[second] + np.timedelta64(72, "h")]
    w = np.linspace(1.0, -1.0, num_labels) if num_labels > 1 else np.ones(1)
    y = z[lab_subj, None] * w[None, :] + rng.normal(scale=0.5, size=(len(lab_subj), num_labels))
    y = y > 0
    labels_file.parent.mkdir(parents=True, exist_ok=True)
    if num_labels == 1:
        lab = {"subject_id": sid[lab_subj], "prediction_time": pt, "boolean_value": y[:, 0]}
    else:
        lab = {
            "subject_id": np.repeat(sid[lab_subj], num_labels),
            "prediction_time": np.repeat(pt, num_labels),
            "boolean_value": y.reshape(-1),
            "categorical_value": np.tile([f"PHENO//{k:02d}" for k in range(num_labels)], len(pt)),
        }
    label_schema = LABEL_SCHEMA
    cols = {
        f.name: pa.array(lab[f.name], f.type)
        if f.name in lab
        else pa.nulls(len(lab["subject_id"]), f.type)
        for f in label_schema
    }
    pq.write_table(pa.table(cols, schema=label_schema), labels_file)
    return {"events": len(table), "subjects": n, "labels": len(pt)}
