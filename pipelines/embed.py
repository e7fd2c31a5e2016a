"""`fusemoe embed`: a user's encoder over raw items (notes, image or ECG paths) -> an embedding
modality of a FlexiModal directory (docs/FLEXIMODAL.md, "Bring your own encoder").

Rows are encoded and stored in (stay_id, time_h) order, whatever the input order. Progress is saved
in parts of `chunk_batches` batches under `embeddings/.<modality>.work/` beside the output, each
written to a temp name and renamed. A rerun with the same input file, encoder (name and source
file) and sizes encodes only the parts that are missing; batch boundaries are fixed by the row
order, so the result equals an uninterrupted run's byte for byte. Anything else changed starts
afresh. The final file is written to a temp name and renamed, then the manifest entry is written
(atomically), then the work directory is removed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusemoe.data.flexi import MANIFEST_FILE, STAYS_FILE, FlexiModalError, cast_losslessly
from fusemoe.data.schema import embedding_file, embedding_schema, is_string_type
from pipelines.common import file_sha256, write_json_atomic

EMBEDDING_VERSION = "1.1"  # the FlexiModal schema version that introduced embedding modalities
WORK_FORMAT = 1  # bump when the work directory's layout changes: older progress is then discarded
# Dictionary-encoding float vectors only costs time (3x the write on real embeddings, no smaller).
PARQUET_OPTIONS = {"use_dictionary": ["stay_id"]}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class EncoderError(ValueError):
    """The encoder cannot be loaded, raised, or returned unusable output. One line."""

    def __init__(self, spec: str, problem: str):
        super().__init__(" ".join(f"encoder {spec}: {problem}".split()))


def load_encoder(spec: str) -> Callable[[list], Any]:
    """The callable named `module:function` (`module:Class.method` too). The working directory is
    importable, as with `python -m`, so an encoder module beside the data is found."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise EncoderError(
            spec, "expected module:function, e.g. fusemoe.data.encoders:hashing_text"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise EncoderError(spec, f"cannot import module '{module_name}' ({e})") from None
    except Exception as e:  # the module itself failed while importing
        raise EncoderError(
            spec, f"importing '{module_name}' raised {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EncoderError(spec, f"module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EncoderError(spec, f"'{attr}' is not callable (type {type(obj).__name__})")
    return obj


@dataclass
class Items:
    """The rows to encode, sorted by (stay_id, time_h); `rows` are their 0-based input rows."""

    stay_id: pa.Array
    time_h: pa.Array
    items: pa.ChunkedArray  # not combined: image bytes may exceed one array's 2 GiB
    rows: np.ndarray

    def where(self, i: int) -> str:
        return f"row {self.rows[i]} (stay '{self.stay_id[i].as_py()}', {self.time_h[i].as_py()} h)"


def read_items(path: str | os.PathLike, item_column: str, stays_path: str | os.PathLike) -> Items:
    """The input table, checked: columns present, no nulls, known stays, finite non-negative
    times, one item per (stay, time). Raises FlexiModalError naming file, row and column."""
    file = str(path)
    if not Path(path).is_file():
        raise FlexiModalError(file, "file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FlexiModalError(file, f"not a readable Parquet file ({e})") from None
    for name in ("stay_id", "time_h", item_column):
        if name not in table.column_names:
            raise FlexiModalError(
                file, f"required column is missing (has {table.column_names})", column=name
            )
        col = table.column(name)
        if col.null_count:
            i = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            what = (
                "item (every row needs one; drop rows without)" if name == item_column else "value"
            )
            raise FlexiModalError(file, f"missing (null) {what}", row=i, column=name)
    if table.num_rows == 0:
        raise FlexiModalError(file, "no rows to encode")

    stay = table.column("stay_id").combine_chunks()
    if pa.types.is_integer(stay.type):
        stay = stay.cast(pa.string())
    if not is_string_type(stay.type):
        raise FlexiModalError(file, f"wrong type {stay.type}, expected string", column="stay_id")
    stay = stay.cast(pa.string())
    empty = pc.equal(pc.utf8_length(stay), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        raise FlexiModalError(
            file, "empty stay_id", row=int(np.flatnonzero(empty)[0]), column="stay_id"
        )

    time = table.column("time_h").combine_chunks()
    if time.type != pa.float32():
        time = cast_losslessly(time, pa.float32(), file, "time_h")
        if time is None:
            raise FlexiModalError(
                file, f"wrong type {table.column('time_h').type}, expected float32", column="time_h"
            )
    t = time.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(t) | (t < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "negative time" if np.isfinite(t[i]) else "time is not finite"
        raise FlexiModalError(file, f"{what} ({t[i]} h)", row=i, column="time_h")

    if not Path(stays_path).is_file():
        raise FlexiModalError(stays_path, "file not found (--out must be a FlexiModal directory)")
    known = pq.read_table(stays_path, columns=["stay_id"]).column("stay_id")
    pos = pc.index_in(stay, value_set=known.combine_chunks().cast(pa.string()))
    unknown = pc.is_null(pos).to_numpy(zero_copy_only=False)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise FlexiModalError(
            file, f"stay_id '{stay[i].as_py()}' is not in {stays_path}", row=i, column="stay_id"
        )

    order = pc.sort_indices(
        pa.table({"s": stay, "t": time}), [("s", "ascending"), ("t", "ascending")]
    )
    stay, time = stay.take(order), time.take(order)
    rows = order.to_numpy(zero_copy_only=False)
    s, t = stay.to_numpy(zero_copy_only=False), time.to_numpy(zero_copy_only=False)
    same = (s[1:] == s[:-1]) & (t[1:] == t[:-1])
    if same.any():
        k = np.flatnonzero(same)
        k = k[np.argmin(rows[k + 1])]  # the first repeat in input order
        raise FlexiModalError(
            file,
            f"stay '{s[k]}' already has an item at {t[k]} h (row {rows[k]}); one item per stay and "
            "time (merge or drop repeats)",
            row=int(rows[k + 1]),
            column="time_h",
        )
    return Items(stay, time, table.column(item_column).take(order), rows)


def _as_matrix(
    out: Any, spec: str, batch: int, items: Items, lo: int, hi: int, width: int | None
) -> np.ndarray:
    """The encoder's output for rows lo..hi as a finite float32 [hi - lo, width] array."""
    where = f"batch {batch} (rows {lo}..{hi - 1} in (stay_id, time_h) order)"
    if hasattr(out, "detach"):  # a torch tensor, without importing torch here
        out = out.detach().float().cpu().numpy()
    try:
        arr = np.asarray(out)
    except ValueError as e:  # ragged lists
        raise EncoderError(spec, f"{where}: output is not an array ({e})") from None
    if arr.dtype.kind not in "fiub":
        raise EncoderError(spec, f"{where}: returned {arr.dtype} values, expected floats")
    if arr.ndim != 2 or arr.shape[0] != hi - lo or arr.shape[1] == 0:
        raise EncoderError(
            spec, f"{where}: returned shape {tuple(arr.shape)}, expected ({hi - lo}, width)"
        )
    if width is not None and arr.shape[1] != width:
        raise EncoderError(
            spec, f"{where}: returned width {arr.shape[1]}, but {width} for earlier batches"
        )
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise EncoderError(
            spec, f"{where}: {arr[r, c]} at {items.where(lo + int(r))}, element {c} (as float32)"
        )
    return arr


def _fingerprint(
    input_path: Path, item_column: str, spec: str, encode: Callable, sizes: tuple
) -> dict:
    """What the saved parts depend on; a rerun resumes only when all of it is unchanged."""
    try:
        source = inspect.getsourcefile(encode)
    except TypeError:  # a builtin or C extension
        source = None
    return {
        "format": WORK_FORMAT,
        "input_sha256": file_sha256(input_path),
        "item_column": item_column,
        "encoder": spec,
        "encoder_source_sha256": file_sha256(source) if source and Path(source).is_file() else None,
        "batch_size": sizes[0],
        "chunk_batches": sizes[1],
    }


def _start_work(work: Path, key: dict, restart: bool) -> None:
    """A work directory holding `key`; saved parts survive only if `key` is unchanged."""
    key_file = work / "key.json"
    if work.exists() and not restart:
        try:
            if json.loads(key_file.read_text()) == key:
                for stale in work.glob(".*.tmp"):  # a part being written when the run died
                    stale.unlink()
                return
        except (OSError, ValueError):
            pass
        print(
            f"embed: {work}: saved progress is of another input, encoder or size; starting afresh"
        )
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_json_atomic(key_file, key)


def _part_width(part: Path) -> int | None:
    """The vector width of a complete saved part, or None when it is absent or unreadable."""
    try:
        return pq.read_schema(part).field("vector").type.list_size
    except (OSError, pa.ArrowException, KeyError):
        return None


def _write_part(part: Path, items: Items, lo: int, hi: int, vectors: np.ndarray) -> None:
    width = vectors.shape[1]
    vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), width)
    table = pa.table(
        [items.stay_id[lo:hi], items.time_h[lo:hi], vector], schema=embedding_schema(width)
    )
    tmp = part.with_name(f".{part.name}.tmp")
    pq.write_table(table, tmp, **PARQUET_OPTIONS)
    os.replace(tmp, part)


def _join_parts(parts: list[Path], items: Items, target: Path) -> int:
    """Streams the saved parts (one row group each) into `target` by temp file and rename;
    returns the width. Each part's rows are checked against the input's, so a stale part can never
    put a vector on the wrong (stay, time)."""
    schema = pq.read_schema(parts[0])
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a run killed here
        stale.unlink()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # open()'s mode, as mkdir's
    try:
        with pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as writer:
            lo = 0
            for part in parts:
                table = pq.read_table(part)
                hi = lo + table.num_rows
                stored = (table.column(c).combine_chunks() for c in ("stay_id", "time_h"))
                expected = (items.stay_id[lo:hi], items.time_h[lo:hi])
                if not all(a.equals(b) for a, b in zip(stored, expected, strict=True)):
                    raise RuntimeError(f"{part} does not hold rows {lo}..{hi - 1} of the input")
                writer.write_table(table)
                lo = hi
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return schema.field("vector").type.list_size


def _encode_parts(
    encode: Callable,
    spec: str,
    items: Items,
    parts: list[Path],
    widths: dict[Path, int | None],
    width: int | None,
    batch_size: int,
    chunk: int,
    modality: str,
) -> int:
    """Encodes and saves the parts not saved yet (widths[part] None); returns how many."""
    from tqdm import tqdm

    n = len(items.rows)
    spans = [(c * chunk, min(n, (c + 1) * chunk)) for c in range(len(parts))]
    done = sum(hi - lo for (lo, hi), p in zip(spans, parts, strict=True) if widths[p] is not None)
    encoded = 0
    # The bar shows on a terminal only, so logs and error output stay one line per message.
    with tqdm(total=n, initial=done, unit="item", desc=f"embed {modality}", disable=None) as bar:
        for (lo_c, hi_c), part in zip(spans, parts, strict=True):
            if widths[part] is not None:
                continue
            vectors = []
            for lo in range(lo_c, hi_c, batch_size):
                hi = min(hi_c, lo + batch_size)
                b = lo // batch_size
                try:
                    out = encode(items.items[lo:hi].to_pylist())
                except Exception as e:
                    raise EncoderError(
                        spec, f"batch {b} (rows {lo}..{hi - 1}) raised {type(e).__name__}: {e}"
                    ) from None
                vectors.append(_as_matrix(out, spec, b, items, lo, hi, width))
                width = vectors[-1].shape[1]
                bar.update(hi - lo)
            _write_part(part, items, lo_c, hi_c, np.concatenate(vectors))
            encoded += 1
    return encoded


def _read_manifest(path: Path) -> dict:
    """The user's manifest as JSON; only its `modalities` list is needed (and rewritten) here."""
    if not path.is_file():
        raise FlexiModalError(path, "file not found (--out must be a FlexiModal directory)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FlexiModalError(path, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("modalities"), list):
        raise FlexiModalError(path, "expected a JSON object with a 'modalities' list")
    return manifest


def _require_embedding_version(manifest: dict) -> None:
    """A manifest that states a FlexiModal version older than 1.1 (the first with embedding
    modalities) is raised to 1.1: the validator refuses an embedding modality in a 1.0 manifest.
    Without the key the reader's own version applies, so none is added."""
    version = str(manifest.get("schema_version", EMBEDDING_VERSION))
    try:
        older = tuple(map(int, version.split("."))) < (1, 1)
    except ValueError:
        older = False  # not a version: left for the validator to report
    if older:
        manifest["schema_version"] = EMBEDDING_VERSION


def embed(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    modality: str,
    encoder: str,
    item_column: str,
    *,
    batch_size: int = 64,
    chunk_batches: int = 16,
    restart: bool = False,
) -> dict:
    """Encode the items of `input_path` into `out_dir/embeddings/<modality>.parquet` and add (or
    replace) `{"name", "kind": "embedding", "width"}` in `out_dir/manifest.json`.

    Returns a summary: rows, width, the output path and how many parts were encoded in this run.
    Bad input raises FlexiModalError, a bad encoder EncoderError; the output file and the
    manifest are then untouched (parts saved before an encoder error stay, for the rerun)."""
    input_path, out_dir = Path(input_path), Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    manifest = _read_manifest(manifest_path)
    if not _NAME.fullmatch(modality):
        raise FlexiModalError(
            manifest_path, f"modality name {modality!r}: use letters, digits, '_', '.', '-'"
        )
    for m in manifest["modalities"]:
        if isinstance(m, dict) and m.get("name") == modality and m.get("kind") != "embedding":
            raise FlexiModalError(
                manifest_path,
                f"modality '{modality}' is already a {m.get('kind')} modality; choose another name",
            )
    items = read_items(input_path, item_column, out_dir / STAYS_FILE)
    encode = load_encoder(encoder)

    target = out_dir / embedding_file(modality)
    work = target.parent / f".{modality}.work"
    _start_work(
        work,
        _fingerprint(input_path, item_column, encoder, encode, (batch_size, chunk_batches)),
        restart,
    )
    n = len(items.rows)
    chunk = batch_size * chunk_batches
    parts = [work / f"part-{c:06d}.parquet" for c in range((n + chunk - 1) // chunk)]
    widths = {p: _part_width(p) for p in parts}
    width = next((w for w in widths.values() if w is not None), None)
    try:
        encoded = _encode_parts(
            encode, encoder, items, parts, widths, width, batch_size, chunk, modality
        )
    except BaseException:
        if not any(work.glob("part-*.parquet")):
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave no trace
            if not any(target.parent.iterdir()):
                target.parent.rmdir()
        raise

    width = _join_parts(parts, items, target)
    _require_embedding_version(manifest)
    entry = {"name": modality, "kind": "embedding", "width": width}
    mods = manifest["modalities"]
    same = [k for k, m in enumerate(mods) if isinstance(m, dict) and m.get("name") == modality]
    if same:
        mods[same[0]] = entry
    else:
        mods.append(entry)
    write_json_atomic(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": n, "width": width, "path": str(target), "parts": len(parts), "encoded": encoded}
