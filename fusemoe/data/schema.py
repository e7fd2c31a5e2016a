"""Versioned Arrow schemas of the FlexiModal format (see docs/FLEXIMODAL.md).

The events schema is fixed; the stays schema depends on the manifest (its label columns and static
variables), so it is built from the manifest by `stays_schema`.
"""

from __future__ import annotations

import pyarrow as pa

# Major version changes break readers; minor versions only add optional manifest keys.
SCHEMA_VERSION = "1.1"  # 1.1: embedding modalities (1.0 files are read unchanged)

SPLITS = ("train", "val", "test")
MODALITY_KINDS = ("series", "static", "embedding")
TASK_KINDS = ("binary", "regression", "multiclass", "multilabel")

# Label column type per task kind. Null = label missing for that stay.
LABEL_TYPES: dict[str, pa.DataType] = {
    "binary": pa.int8(),
    "multiclass": pa.int16(),
    "regression": pa.float32(),
    "multilabel": pa.list_(pa.int8()),
}
STATIC_TYPE = pa.float32()

_DICT_STR = pa.dictionary(pa.int32(), pa.string())
_META = {b"fusemoe.schema_version": SCHEMA_VERSION.encode()}

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("stay_id", pa.string(), nullable=False),
        pa.field("modality", _DICT_STR, nullable=False),
        pa.field("variable", _DICT_STR, nullable=False),
        pa.field("time_h", pa.float32(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ],
    metadata=_META,
)


def embedding_schema(width: int) -> pa.Schema:
    """One vector per (stay, time) of an embedding modality (a note, an image, an ECG), stored in
    its own file `embeddings/<modality>.parquet`. A fixed-size list keeps the vectors in one
    contiguous float32 buffer (zero-copy to a [rows, width] array), and keeping them out of the
    long scalar events table spares every scalar row an empty vector column."""
    return pa.schema(
        [
            pa.field("stay_id", pa.string(), nullable=False),
            pa.field("time_h", pa.float32(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), width), nullable=False),
        ],
        metadata=_META,
    )


def embedding_file(modality: str) -> str:
    """Where an embedding modality's vectors live inside a FlexiModal directory."""
    return f"embeddings/{modality}.parquet"


def static_variables(manifest: dict) -> list[str]:
    """Variables of the (at most one) static modality, in manifest order."""
    for m in manifest["modalities"]:
        if m["kind"] == "static":
            return list(m["variables"])
    return []


def series_modalities(manifest: dict) -> list[dict]:
    return [m for m in manifest["modalities"] if m["kind"] == "series"]


def embedding_modalities(manifest: dict) -> list[dict]:
    """Modalities whose events are vectors (`{"name", "kind": "embedding", "width"}`)."""
    return [m for m in manifest["modalities"] if m["kind"] == "embedding"]


def stays_schema(manifest: dict) -> pa.Schema:
    """stay_id, split, one column per task, one float32 column per static variable."""
    fields = [pa.field("stay_id", pa.string(), nullable=False), pa.field("split", pa.string())]
    fields += [pa.field(t["column"], LABEL_TYPES[t["kind"]]) for t in manifest["tasks"]]
    fields += [pa.field(v, STATIC_TYPE) for v in static_variables(manifest)]
    return pa.schema(fields, metadata=_META)


def is_string_type(t: pa.DataType) -> bool:
    """Plain or dictionary-encoded string (pandas categoricals arrive as dictionaries)."""
    if pa.types.is_dictionary(t):
        return pa.types.is_integer(t.index_type) and is_string_type(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Exact match, except that any string encoding stands for a string column."""
    if is_string_type(expected):
        return is_string_type(actual)
    if pa.types.is_list(expected):
        return (
            pa.types.is_list(actual) or pa.types.is_large_list(actual)
        ) and actual.value_type == expected.value_type
    return actual == expected
