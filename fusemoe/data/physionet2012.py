"""PhysioNet/CinC Challenge 2012 ("P12") raw files -> FlexiModal tables.

Input: a directory with `set-{a,b,c}.tar.gz` (or extracted `set-{a,b,c}/`) and
`Outcomes-{a,b,c}.txt`, e.g. ../shared/data/physionet2012 (see its README), or files downloaded
from PhysioNet by `download_physionet2012`. Contents are verified by per-set record digests (not
tarball hashes, which differ between PhysioNet and repacked copies) and Outcomes SHA-256.

Modalities (why: what is measured together, by whom, and how often, so that a modality goes
missing for a clinical reason rather than at random):
- vitals: bedside-monitored or nurse-charted signals, recorded every few minutes to hours in
  nearly every stay: heart rate, invasive and non-invasive blood pressures, temperature,
  respiration rate, GCS, urine output and charted weight.
- labs: blood drawn for the central laboratory (chemistry, haematology, liver panel, cardiac
  markers), a few times a day.
- respiratory: arterial blood gas and ventilation (pH, PaCO2, PaO2, SaO2, FiO2, MechVent),
  which exist mainly for ventilated patients or those with an arterial line, so the modality is
  absent for about a quarter of stays.
- static: descriptors at ICU admission: Age, Gender, Height, admission Weight and ICUType
  (one-hot, since the four units are categories, not an order).

Cleaning rules (all counted in the manifest's `cleaning` section):
- `-1` is "unknown": descriptors become null; in series every negative value is dropped (all P12
  series variables are physically non-negative; this also removes Temp -17.8 = 0 degF entries).
- Implausible series values are dropped by the ranges in PLAUSIBLE (e.g. Temp outside 20-45 C,
  pH outside 6.5-8.0 which are scale errors like 735, zero heart rate / blood pressure / weight).
  Implausible Height (outside 100-250 cm) and admission Weight (outside 20-300 kg) become null.
- Several values of one variable at the same time are replaced by their mean.
- The first occurrence of each descriptor at 00:00 is the descriptor, wherever it sits among the
  00:00 lines; later Weight lines are series values. Any other repeat of a descriptor is an error.
- set-c lines with an empty parameter name are dropped (the data do not say which variable).
- The 12 stays with descriptors only are kept: they simply have no series modalities.
- Length_of_stay -1 gives null los labels (missing), not a negative stay.
Anything else malformed (bad header, wrong field count, bad time, unknown variable, non-numeric or
non-finite value, missing descriptor, duplicated stay, label outside its domain, a record with no
lines at all) raises FlexiModalError naming file, record and line.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fusemoe.data.flexi import FlexiModalError, assign_splits

BASE_URL = "https://physionet.org/files/challenge-2012/1.0.0/"
SETS = ("a", "b", "c")
# Per-set digest of record contents (README "content digest"): sha256 over the lines
# f"{sha256(file)}  {name}\n" in byte-sorted name order.
CONTENT_DIGESTS = {
    "a": "9522c1a728116ed24ea0cf65a4237abe4dbcdf9c9f8d9fe9712e180fcf88bf8e",
    "b": "703e7b83060192492498fb05880bd882f868e713ff3406ebc19c8949cfb8a053",
    "c": "e24b1660cb1ee052987b17bc16677e7b171440f067eaf3f437000bb71385edc9",
}
OUTCOMES_SHA256 = {
    "a": "2613ea60ccda29f87571a7d6b09ad130858a8ccd66325bd073365925026883c2",
    "b": "1305f29734da374a809483229a99f33a9230aa8d4fa74b1a2d6ad788136423d5",
    "c": "0b32dcb7753c0f18f2f5fde498a28618b8879c5e527ce0dae8ad120dd7e205c9",
}
HEADER = b"Time,Parameter,Value\n"
OUTCOMES_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"

DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")
MODALITIES: dict[str, list[str]] = {
    "vitals": [
        "HR",
        "SysABP",
        "DiasABP",
        "MAP",
        "NISysABP",
        "NIDiasABP",
        "NIMAP",
        "Temp",
        "RespRate",
        "GCS",
        "Urine",
        "Weight",
    ],
    "labs": [
        "BUN",
        "Creatinine",
        "Glucose",
        "Na",
        "K",
        "Mg",
        "HCO3",
        "HCT",
        "Platelets",
        "WBC",
        "Lactate",
        "ALP",
        "ALT",
        "AST",
        "Bilirubin",
        "Albumin",
        "Cholesterol",
        "TroponinI",
        "TroponinT",
    ],
    "respiratory": ["pH", "PaCO2", "PaO2", "SaO2", "FiO2", "MechVent"],
}
ICU_TYPES = {1: "ICU_CCU", 2: "ICU_CSRU", 3: "ICU_MICU", 4: "ICU_SICU"}
STATIC = ["Age", "Gender", "Height", "Weight", *ICU_TYPES.values()]
SERIES_VARS = [v for vs in MODALITIES.values() for v in vs]
SERIES_MODALITY = [m for m, vs in MODALITIES.items() for _ in vs]

# Plausible range per series variable (inclusive); values outside are dropped and counted.
# Default [0, inf): every P12 series variable is non-negative and -1 marks "unknown".
_POSITIVE = 1e-6  # "strictly positive": zero is an artefact for these signals
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "HR": (_POSITIVE, 300),
    "SysABP": (_POSITIVE, 300),
    "DiasABP": (_POSITIVE, 300),
    "MAP": (_POSITIVE, 300),
    "NISysABP": (_POSITIVE, 300),
    "NIDiasABP": (_POSITIVE, 300),
    "NIMAP": (_POSITIVE, 300),
    "RespRate": (_POSITIVE, 100),
    "Temp": (20, 45),
    "Weight": (20, 300),
    "GCS": (3, 15),
    "pH": (6.5, 8.0),
    "FiO2": (0.21, 1.0),
    "SaO2": (_POSITIVE, 100),
    "HCT": (_POSITIVE, 100),
}
STATIC_PLAUSIBLE = {"Height": (100.0, 250.0), "Weight": (20.0, 300.0)}

_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
_NONFINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_TIME_BITS = 12  # minutes 0..4095 (48 h = 2880)
_VAR_BITS = 6


def los_task_name(threshold_days: float) -> str:
    return f"los_gt{threshold_days:g}"


# ----------------------------------------------------------------------------- raw files


def _set_files(
    raw_dir: Path, s: str, lazy: bool = False
) -> tuple[str, list[tuple[str, bytes | Path]]]:
    """(label for messages, [(file name, bytes)] in byte-sorted name order) of one set.

    `lazy`: an extracted folder's files are given as paths instead of bytes, read when needed
    (`_bytes`), so a set's records need not all be in memory at once; a tarball's are always
    read (gzip has no random access; the published P12 sets are 25 MB each)."""
    folder, tarball = raw_dir / f"set-{s}", raw_dir / f"set-{s}.tar.gz"
    files: list[tuple[str, bytes | Path]] = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file():
                files.append((p.name, p if lazy else p.read_bytes()))
        label = str(folder)
    elif tarball.is_file():
        label = str(tarball)
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                for member in tar:
                    if member.isfile():
                        parts = member.name.split("/")
                        if len(parts) != 2 or parts[0] != f"set-{s}":
                            raise FlexiModalError(tarball, f"unexpected member '{member.name}'")
                        files.append((parts[1], tar.extractfile(member).read()))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise FlexiModalError(tarball, f"truncated or corrupt archive ({e})") from None
    else:
        raise FlexiModalError(raw_dir, f"neither set-{s}/ nor set-{s}.tar.gz found")
    files.sort(key=lambda f: f[0].encode())
    if not files:
        raise FlexiModalError(label, "no record files")
    return label, files


def _bytes(data: bytes | Path) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else data


def content_digest(files: list[tuple[str, bytes | Path]]) -> str:
    """The README's per-set digest: independent of tar metadata and compression."""
    h = hashlib.sha256()
    for name, data in sorted(files, key=lambda f: f[0].encode()):
        h.update(f"{hashlib.sha256(_bytes(data)).hexdigest()}  {name}\n".encode())
    return h.hexdigest()


def _check_set(label: str | os.PathLike, s: str, digest: str) -> None:
    if digest != CONTENT_DIGESTS.get(s):
        raise FlexiModalError(
            label,
            f"content digest {digest[:16]}... does not match the published "
            f"{CONTENT_DIGESTS.get(s, '?')[:16]}... (modified or incomplete copy; "
            "set verify_digests: false to accept it)",
        )


def _check_outcomes(label: str | os.PathLike, s: str, data: bytes) -> None:
    if s in OUTCOMES_SHA256 and hashlib.sha256(data).hexdigest() != OUTCOMES_SHA256[s]:
        raise FlexiModalError(
            label,
            "SHA-256 does not match the published file (set verify_digests: false to accept it)",
        )


def raw_file_names(sets: tuple[str, ...] = SETS) -> list[str]:
    """The files PhysioNet publishes for `sets`: set-X.tar.gz and Outcomes-X.txt."""
    return [name for s in sets for name in (f"set-{s}.tar.gz", f"Outcomes-{s}.txt")]


def verify_raw_dir(
    raw_dir: str | os.PathLike, sets: tuple[str, ...] = SETS, where: str | None = None
) -> None:
    """Checks each set's content digest and Outcomes SHA-256 against the published values.

    Cheaper than `read_physionet2012` (no parsing), so a copy can be checked before it is kept.
    `where` (a URL or mirror path) names the files in the error instead of `raw_dir`.
    """
    raw = Path(raw_dir)
    try:
        for s in sets:
            label, files = _set_files(raw, s, lazy=True)
            _check_set(label, s, content_digest(files))
            del files
            outcomes = raw / f"Outcomes-{s}.txt"
            if not outcomes.is_file():
                raise FlexiModalError(outcomes, "file not found")
            _check_outcomes(outcomes, s, outcomes.read_bytes())
    except FlexiModalError as e:
        if where is None:
            raise
        file, _, problem = str(e).replace(str(raw), where.rstrip("/"), 1).partition(": ")
        raise FlexiModalError(file, problem) from None


def _locate(label: str, names: list[str], starts: np.ndarray, row: int) -> dict:
    """FlexiModalError location of a global data row: file, record and 1-based file line."""
    f = int(np.searchsorted(starts, row, side="right") - 1)
    return {
        "file": f"{label}:{names[f]}" if label.endswith(".tar.gz") else f"{label}/{names[f]}",
        "record": names[f].removesuffix(".txt"),
        "line": int(row - starts[f]) + 2,
    }


def _parse_set(label: str, files: list[tuple[str, bytes]], cleaning: dict) -> dict:
    """Vectorised parse of one set: descriptors [F, 6] and series (file, var, minute, value)."""
    names, bodies, lines = [], [], []
    for name, data in files:
        if not name.endswith(".txt"):
            continue
        where = f"{label}:{name}" if label.endswith(".tar.gz") else f"{label}/{name}"
        rec = name.removesuffix(".txt")
        if not re.fullmatch(r"\d+", rec):
            raise FlexiModalError(where, "record file name is not <RecordID>.txt")
        if not data.startswith(HEADER):
            if data.strip() == HEADER.strip():
                data = HEADER
            else:
                raise FlexiModalError(
                    where,
                    "missing header 'Time,Parameter,Value' (garbled record)",
                    record=rec,
                    line=1,
                )
        body = data[len(HEADER) :]
        if not body:
            raise FlexiModalError(where, "record has no observations at all", record=rec)
        if not body.endswith(b"\n"):
            body += b"\n"  # a cut-off last line is caught by the field / format checks below
        n = body.count(b"\n")
        if body.count(b",") != 2 * n:
            for j, line in enumerate(body.split(b"\n")[:n]):
                if line.count(b",") != 2:
                    raise FlexiModalError(
                        where,
                        f"expected 3 fields Time,Parameter,Value, got {line.count(b',') + 1}: "
                        f"{line[:60].decode(errors='replace')!r} (truncated or garbled record)",
                        record=rec,
                        line=j + 2,
                    )
        names.append(name)
        bodies.append(body)
        lines.append(n)
    if not names:
        raise FlexiModalError(label, "no <RecordID>.txt record files")
    starts = np.concatenate([[0], np.cumsum(lines)]).astype(np.int64)
    table = pacsv.read_csv(
        io.BytesIO(b"".join(bodies)),
        read_options=pacsv.ReadOptions(column_names=["t", "p", "v"], block_size=1 << 24),
        parse_options=pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in "tpv"}, strings_can_be_null=False
        ),
    )
    assert table.num_rows == starts[-1], "CSV row count differs from line count"
    file_idx = np.repeat(np.arange(len(names)), lines)

    def fail(row: int, problem: str, column: str | None = None):
        raise FlexiModalError(problem=problem, column=column, **_locate(label, names, starts, row))

    t = table.column("t").combine_chunks()
    ok = pc.match_substring_regex(t, r"^\d\d:[0-5]\d$").to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        s = t[i].as_py()
        fail(i, f"negative time '{s}'" if s.startswith("-") else f"malformed time '{s}' (HH:MM)")
    minutes = (
        pc.cast(pc.utf8_slice_codeunits(t, 0, 2), pa.int32()).to_numpy() * 60
        + pc.cast(pc.utf8_slice_codeunits(t, 3, 5), pa.int32()).to_numpy()
    )
    if minutes.max() >= 1 << _TIME_BITS:
        i = int(np.argmax(minutes))
        fail(i, f"time {t[i].as_py()} is beyond the 48 h window")

    p = pc.dictionary_encode(table.column("p").combine_chunks())
    known = {name: k for k, name in enumerate(DESCRIPTORS)}
    known |= {name: len(DESCRIPTORS) + k for k, name in enumerate(SERIES_VARS) if name != "Weight"}
    known[""] = -1
    pdict = p.dictionary.to_pylist()
    unknown = [k for k, name in enumerate(pdict) if name not in known]
    codes_np = p.indices.to_numpy()
    if unknown:
        i = int(np.flatnonzero(np.isin(codes_np, unknown))[0])
        fail(i, f"unknown variable '{pdict[codes_np[i]]}'", "Parameter")
    param = np.array([known[name] for name in pdict], np.int64)[codes_np]

    v = table.column("v").combine_chunks()
    ok = pc.match_substring_regex(v, _NUMBER).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        s = v[i].as_py()
        if s.strip().lower() in _NONFINITE:
            fail(i, f"non-finite value '{s}'", "Value")
        fail(i, "missing value (empty field)" if not s else f"non-numeric value '{s}'", "Value")
    value = pc.cast(v, pa.float64()).to_numpy()
    if not np.isfinite(value).all():
        i = int(np.flatnonzero(~np.isfinite(value))[0])
        fail(i, f"non-finite value '{v[i].as_py()}'", "Value")
    del table, t, v, p

    empty = param == -1
    cleaning["empty_parameter_rows"] += int(empty.sum())
    cleaning["stays_with_empty_parameter_rows"] += int(np.unique(file_idx[empty]).size)

    # Descriptors: first occurrence of each descriptor name at 00:00.
    rows = np.arange(param.size)
    cand = rows[(param >= 0) & (param < len(DESCRIPTORS)) & (minutes == 0)]
    _, first = np.unique(file_idx[cand] * len(DESCRIPTORS) + param[cand], return_index=True)
    desc_rows = cand[first]
    desc = np.full((len(names), len(DESCRIPTORS)), np.nan)
    desc[file_idx[desc_rows], param[desc_rows]] = value[desc_rows]
    missing = np.isnan(desc)
    if missing.any():
        f, k = np.argwhere(missing)[0]
        raise FlexiModalError(
            problem=f"missing descriptor '{DESCRIPTORS[k]}' at 00:00 (truncated or garbled record)",
            **{**_locate(label, names, starts, int(starts[f])), "line": None},
        )
    is_desc = np.zeros(param.size, bool)
    is_desc[desc_rows] = True
    weight = DESCRIPTORS.index("Weight")
    other_desc = (param >= 0) & (param < len(DESCRIPTORS)) & (param != weight) & ~is_desc
    if other_desc.any():
        i = int(np.flatnonzero(other_desc)[0])
        fail(i, f"descriptor '{DESCRIPTORS[param[i]]}' repeated or not at 00:00", "Parameter")
    ids = np.array([int(n.removesuffix(".txt")) for n in names])
    bad = desc[:, 0] != ids
    if bad.any():
        f = int(np.flatnonzero(bad)[0])
        fail(
            int(desc_rows[(file_idx[desc_rows] == f) & (param[desc_rows] == 0)][0]),
            f"RecordID {desc[f, 0]:g} does not match the file name",
        )
    line_in_file = rows - starts[file_idx]
    cleaning["records_with_interleaved_descriptors"] += int(
        np.unique(file_idx[desc_rows[line_in_file[desc_rows] >= len(DESCRIPTORS)]]).size
    )

    series = ~empty & ~is_desc & (param >= weight)
    var = np.where(param == weight, len(DESCRIPTORS) + SERIES_VARS.index("Weight"), param)
    return {
        "names": names,
        "ids": ids,
        "descriptors": desc,
        "file": file_idx[series],
        "var": var[series] - len(DESCRIPTORS),
        "minute": minutes[series],
        "value": value[series],
    }


def _clean_series(parsed: dict, cleaning: dict) -> dict:
    """Drop implausible values, average repeats at one time; sorted by (stay, variable, time)."""
    var, value = parsed["var"], parsed["value"]
    lo = np.array([PLAUSIBLE.get(v, (0.0, np.inf))[0] for v in SERIES_VARS])
    hi = np.array([PLAUSIBLE.get(v, (0.0, np.inf))[1] for v in SERIES_VARS])
    drop = (value < lo[var]) | (value > hi[var])
    for k in np.flatnonzero(np.bincount(var[drop], minlength=len(SERIES_VARS))):
        name = SERIES_VARS[k]
        cleaning["implausible_dropped"][name] = cleaning["implausible_dropped"].get(name, 0) + int(
            (var[drop] == k).sum()
        )
    keep = ~drop
    key = ((parsed["file"][keep].astype(np.int64) << _VAR_BITS | var[keep]) << _TIME_BITS) | parsed[
        "minute"
    ][keep]
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=value[keep], minlength=uniq.size) / counts
    cleaning["repeated_rows_merged"] += int(keep.sum() - uniq.size)
    cleaning["repeated_groups"] += int((counts > 1).sum())
    return {
        "file": (uniq >> (_VAR_BITS + _TIME_BITS)).astype(np.int64),
        "var": ((uniq >> _TIME_BITS) & ((1 << _VAR_BITS) - 1)).astype(np.int64),
        "minute": (uniq & ((1 << _TIME_BITS) - 1)).astype(np.int64),
        "value": mean,
    }


# Raw bytes of records parsed at once: the parse's arrays take ~30x their input, so chunks bound
# prepare's peak memory whatever the size of a set (every parse and cleaning rule is per record).
PARSE_CHUNK_BYTES = 16 << 20


def _parse_records(
    label: str, files: list[tuple[str, bytes | Path]], cleaning: dict
) -> Iterator[dict]:
    """`_parse_set` + `_clean_series` over chunks of about PARSE_CHUNK_BYTES of records (read
    only when their chunk is parsed): per chunk its records' names, ids and descriptors and its
    events, with the compact dtypes the events table stores (file i32 counted from the set's
    first record, var i8, time_h f32, value f32)."""
    records = [f for f in files if f[0].endswith(".txt")]
    if not records:
        raise FlexiModalError(label, "no <RecordID>.txt record files")
    start = 0
    while start < len(records):
        stop, size = start, 0
        while stop < len(records) and (stop == start or size < PARSE_CHUNK_BYTES):
            data = records[stop][1]
            size += data.stat().st_size if isinstance(data, Path) else len(data)
            stop += 1
        chunk = [(name, _bytes(data)) for name, data in records[start:stop]]
        parsed = _parse_set(label, chunk, cleaning)
        del chunk
        c = _clean_series(parsed, cleaning)
        yield {
            "names": parsed["names"],
            "ids": parsed["ids"],
            "descriptors": parsed["descriptors"],
            "file": (c["file"] + start).astype(np.int32),
            "var": c["var"].astype(np.int8),
            "time_h": (c["minute"] / 60.0).astype(np.float32),
            "value": c["value"].astype(np.float32),
        }
        del parsed, c
        start = stop


def _read_outcomes(path: Path, verify: bool) -> pd.DataFrame:
    if not path.is_file():
        raise FlexiModalError(path, "file not found")
    data = path.read_bytes()
    if verify:
        _check_outcomes(path, path.name[-5], data)
    text = data.decode(errors="replace").splitlines()
    if not text or text[0].strip() != OUTCOMES_HEADER:
        raise FlexiModalError(path, f"header must be '{OUTCOMES_HEADER}'", line=1)
    ids, los, death = [], [], []
    seen: dict[int, int] = {}
    for j, line in enumerate(text[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 6:
            raise FlexiModalError(path, f"expected 6 fields, got {len(parts)}", line=j)
        try:
            rid = int(parts[0])
            nums = [float(x) for x in parts[1:]]
        except ValueError:
            raise FlexiModalError(path, f"non-numeric field in {line!r}", line=j) from None
        if not all(np.isfinite(nums)):
            raise FlexiModalError(path, f"non-finite value in {line!r}", line=j)
        if rid in seen:
            raise FlexiModalError(
                path,
                f"duplicated stay id {rid} (first on line {seen[rid]})",
                line=j,
                record=str(rid),
            )
        seen[rid] = j
        if nums[4] not in (0, 1):
            raise FlexiModalError(
                path,
                f"In-hospital_death {nums[4]:g} is outside its domain {{0,1}}",
                line=j,
                record=str(rid),
                column="In-hospital_death",
            )
        if nums[2] < 0 and nums[2] != -1:
            raise FlexiModalError(
                path,
                f"Length_of_stay {nums[2]:g} is outside its domain (>= 0 days, -1 = unknown)",
                line=j,
                record=str(rid),
                column="Length_of_stay",
            )
        ids.append(rid)
        los.append(np.nan if nums[2] == -1 else nums[2])
        death.append(int(nums[4]))
    return pd.DataFrame({"RecordID": ids, "los": los, "ihm": death, "line": list(seen.values())})


# ----------------------------------------------------------------------------- public API


def read_physionet2012(
    raw_dir: str | os.PathLike,
    *,
    sets: tuple[str, ...] = SETS,
    split: tuple[float, float, float] | list[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    los_threshold_days: float = 7.0,
    verify: bool = True,
    spill_dir: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pa.Table | Iterator[pa.Table], dict]:
    """Raw P12 files -> (stays, events, manifest) ready for `write_flexi`.

    `verify` checks each set's content digest and each Outcomes file's SHA-256 against the
    published values (after parsing, so a malformed record gets its precise error first).
    With `spill_dir` (an existing directory, which the caller removes), each parse chunk's
    events go to a file there (13 bytes per event) and `events` is a stream of tables, one per
    chunk, read back from it: the stays and their split need every record parsed first, and
    this way neither the records nor the events are all in memory at once. Without it,
    `events` is one table.
    """
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise FlexiModalError(raw, "raw data directory not found")
    cleaning: dict = {
        "empty_parameter_rows": 0,
        "stays_with_empty_parameter_rows": 0,
        "records_with_interleaved_descriptors": 0,
        "repeated_rows_merged": 0,
        "repeated_groups": 0,
        "implausible_dropped": {},
        "static_unknown": {},
        "static_implausible_nulled": {},
    }
    hashes: dict[str, str] = {}
    stays_parts: list[tuple[pd.DataFrame, np.ndarray]] = []
    event_parts: list[dict | Path] = []  # per parse chunk: its arrays, or their spill file
    with_series: list[np.ndarray] = []
    id_set: dict[int, str] = {}
    offset = 0
    for s in sets:
        label, files = _set_files(raw, s, lazy=True)
        digest = content_digest(files)
        names, ids, descriptors = [], [], []
        for part in _parse_records(label, files, cleaning):
            names += part.pop("names")
            ids.append(part.pop("ids"))
            descriptors.append(part.pop("descriptors"))
            part["file"] += np.int32(offset)
            with_series.append(np.unique(part["file"]))
            if spill_dir is not None:
                path = Path(spill_dir) / f"events-{len(event_parts):05d}.npz"
                np.savez(path, **{f"array_{k}": v for k, v in part.items()})
                part = path
            event_parts.append(part)
        del files
        parsed = {
            "names": names,
            "ids": np.concatenate(ids),
            "descriptors": np.concatenate(descriptors),
        }
        for rid, name in zip(parsed["ids"], parsed["names"], strict=True):
            if rid in id_set:
                raise FlexiModalError(
                    f"{label}:{name}",
                    f"duplicated stay id {rid} (also in {id_set[rid]})",
                    record=str(rid),
                )
            id_set[int(rid)] = label
        if verify:
            _check_set(label, s, digest)
        outcomes_path = raw / f"Outcomes-{s}.txt"
        outcomes = _read_outcomes(outcomes_path, verify)
        hashes[f"set-{s}"] = digest
        hashes[f"Outcomes-{s}.txt"] = hashlib.sha256(outcomes_path.read_bytes()).hexdigest()
        outc = outcomes.set_index("RecordID")
        missing = np.setdiff1d(parsed["ids"], outc.index.to_numpy())
        if missing.size:
            raise FlexiModalError(
                outcomes_path, f"no outcome row for record {missing[0]}", record=str(missing[0])
            )
        extra = np.setdiff1d(outc.index.to_numpy(), parsed["ids"])
        if extra.size:
            line = int(outc.loc[extra[0], "line"])
            raise FlexiModalError(
                outcomes_path, f"outcome for record {extra[0]} which has no record file", line=line
            )
        outc = outc.loc[parsed["ids"]]
        desc = parsed["descriptors"]
        st = pd.DataFrame({"stay_id": parsed["ids"].astype(str)})
        st["ihm"] = outc["ihm"].to_numpy().astype(np.int8)
        los = outc["los"].to_numpy()
        st["los_gt"] = pd.array(np.where(np.isnan(los), pd.NA, los > los_threshold_days), "Int8")
        st["los_days"] = pd.array(los, "Float32")
        stays_parts.append((st, desc))
        offset += len(parsed["ids"])

    stays = pd.concat([p[0] for p in stays_parts], ignore_index=True)
    desc = np.concatenate([p[1] for p in stays_parts])
    stays = _static_columns(stays, desc, cleaning)
    task = los_task_name(los_threshold_days)
    stays = stays.rename(columns={"los_gt": task})
    stays.insert(1, "subject_id", stays["stay_id"])  # P12 holds one ICU stay per patient
    stays.insert(1, "split", assign_splits(stays, split, seed, "ihm", group_col="subject_id"))

    has_series = np.zeros(len(stays), dtype=bool)
    has_series[np.concatenate(with_series)] = True
    cleaning["stays_without_series"] = int((~has_series).sum())
    cleaning["stays_without_series_ids"] = stays["stay_id"][~has_series].tolist()
    cleaning["los_unknown"] = int(stays["los_days"].isna().sum())
    stay_ids = pa.array(stays["stay_id"].to_numpy(), pa.string())
    events = _event_tables(event_parts, stay_ids)
    if spill_dir is None:
        events = pa.concat_tables(list(events)).combine_chunks()
    manifest = {
        "source": "physionet2012",
        "source_url": BASE_URL,
        "source_hashes": hashes,
        "sets": list(sets),
        "split": {"fractions": list(split), "seed": seed, "stratify": "ihm"},
        "modalities": [
            {"name": m, "kind": "series", "variables": list(vs)} for m, vs in MODALITIES.items()
        ]
        + [{"name": "static", "kind": "static", "variables": STATIC}],
        "tasks": [
            {"name": "ihm", "kind": "binary", "column": "ihm", "num_outputs": 1},
            {
                "name": task,
                "kind": "binary",
                "column": task,
                "num_outputs": 1,
                "threshold_days": los_threshold_days,
            },
            {"name": "los_days", "kind": "regression", "column": "los_days", "num_outputs": 1},
        ],
        "cleaning": cleaning,
    }
    return stays, events, manifest


def _event_tables(parts: list[dict | Path], stay_ids: pa.Array) -> Iterator[pa.Table]:
    """The events table of each parse chunk (its arrays, or its spill file read back)."""
    mod_names = list(MODALITIES)
    mod_of_var = np.array([mod_names.index(m) for m in SERIES_MODALITY], np.int32)
    for part in parts:
        if isinstance(part, Path):
            with np.load(part) as saved:
                part = {k.removeprefix("array_"): saved[k] for k in saved.files}
        yield pa.table(
            {
                "stay_id": pc.take(stay_ids, pa.array(part["file"])),
                "modality": pa.DictionaryArray.from_arrays(
                    pa.array(mod_of_var[part["var"]], pa.int32()), pa.array(mod_names)
                ),
                "variable": pa.DictionaryArray.from_arrays(
                    pa.array(part["var"].astype(np.int32)), pa.array(SERIES_VARS)
                ),
                "time_h": pa.array(part["time_h"]),
                "value": pa.array(part["value"]),
            }
        )


def _static_columns(stays: pd.DataFrame, desc: np.ndarray, cleaning: dict) -> pd.DataFrame:
    """Descriptor matrix [N, 6] -> float32 static columns with null for unknown/implausible."""
    col = {name: desc[:, k].astype(np.float64) for k, name in enumerate(DESCRIPTORS)}
    out = {}
    for name in ("Age", "Gender", "Height", "Weight"):
        x = col[name].copy()
        unknown = x < 0
        cleaning["static_unknown"][name] = int(unknown.sum())
        x[unknown] = np.nan
        if name == "Gender":
            odd = ~np.isnan(x) & ~np.isin(x, (0, 1))
        elif name in STATIC_PLAUSIBLE:
            lo, hi = STATIC_PLAUSIBLE[name]
            odd = ~np.isnan(x) & ((x < lo) | (x > hi))
        else:
            odd = np.zeros(x.size, bool)
        cleaning["static_implausible_nulled"][name] = int(odd.sum())
        x[odd] = np.nan
        out[name] = x
    icu = col["ICUType"]
    known = np.isin(icu, list(ICU_TYPES))
    cleaning["static_unknown"]["ICUType"] = int((~known).sum())
    for code, name in ICU_TYPES.items():
        out[name] = np.where(known, (icu == code).astype(np.float64), np.nan)
    for name in STATIC:
        stays[name] = pd.array(out[name], "Float32")
    return stays


class DownloadError(FlexiModalError):
    """A raw file could not be fetched (network, HTTP status): the message names the URL."""


def download_physionet2012(
    dest_dir: str | os.PathLike, base_url: str = BASE_URL, sets: tuple[str, ...] = SETS
) -> Path:
    """Fetches `raw_file_names(sets)` from `base_url` into `dest_dir`, with a progress bar each.

    Each file is written to a .part name and renamed when complete. The content is not checked
    here: call `verify_raw_dir` (PhysioNet's tarball bytes differ from mirrors', their records
    do not).
    """
    import requests
    from tqdm import tqdm

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in raw_file_names(sets):
        url = base_url.rstrip("/") + "/" + name
        target = dest / name
        part = target.with_name(f".{name}.part")
        try:
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length", 0)) or None
                with (
                    open(part, "wb") as f,
                    tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar,
                ):
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
        except requests.HTTPError as e:
            raise DownloadError(url, f"download failed (HTTP {e.response.status_code})") from None
        except requests.Timeout:
            raise DownloadError(url, "download failed (timed out)") from None
        except requests.ConnectionError:
            raise DownloadError(url, "download failed (cannot connect)") from None
        except requests.RequestException as e:
            raise DownloadError(url, f"download failed ({type(e).__name__})") from None
        os.replace(part, target)
    return dest
