"""`fusemoe embed`: a user's encoder over raw items -> an embedding modality of a FlexiModal directory.

The resume after kill -9 (a full run) and one bad input run the real console script; the rest
calls `pipelines.embed.embed` in-process (the CLI prints its messages as they are)."""

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusemoe.data.encoders import hashing_text
from fusemoe.data.flexi import STAYS_FILE, FlexiModalError
from fusemoe.data.schema import embedding_schema
from fusemoe.data.synthetic import write_synthetic
from pipelines.common import file_sha256
from pipelines.embed import EncoderError, embed

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FUSEMOE = Path(sys.executable).parent / "fusemoe"
MODALITY = "discharge_note"
HASHING = "fusemoe.data.encoders:hashing_text"
# 12 stays x 5 notes = 60 rows; 4 per batch, 2 batches per saved part: 15 batches in 8 parts.
SIZES = ("--batch-size", "4", "--chunk-batches", "2")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("embed-source")
    write_synthetic(d / "flexi", num_stays=12, seed=0)
    ids = sorted(pq.read_table(d / "flexi" / STAYS_FILE).column("stay_id").to_pylist())
    rng = np.random.default_rng(0)
    vocab = "stable febrile hypotensive intubated extubated sedated septic alert".split()
    notes = pd.DataFrame(
        [
            {
                "stay_id": s,
                "time_h": 6.0 * k,
                "text": f"{s} day {k}: {' '.join(rng.choice(vocab, 4))}",
            }
            for s in ids
            for k in range(5)
        ]
    )
    # Shuffled: the output is in (stay_id, time_h) order whatever the input order.
    notes.sample(frac=1.0, random_state=0).reset_index(drop=True).to_parquet(
        d / "notes.parquet", index=False
    )
    return d


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A fresh copy of the FlexiModal directory and the notes for each test."""
    shutil.copytree(source / "flexi", tmp_path / "flexi")
    shutil.copy(source / "notes.parquet", tmp_path / "notes.parquet")
    return tmp_path


def notes(data: Path) -> pd.DataFrame:
    return pd.read_parquet(data / "notes.parquet")


def fusemoe_embed(data: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])} | (env or {})
    cmd = [str(FUSEMOE), "embed", "notes.parquet", "--item-column", "text"]
    cmd += ["--modality", MODALITY, "--out", "flexi", *args]
    return subprocess.run(cmd, cwd=data, env=env, capture_output=True, text=True, timeout=120)


def embed_notes(data: Path, encoder: str = HASHING, **kwargs) -> dict:
    return embed(
        data / "notes.parquet", data / "flexi", MODALITY, encoder, "text", batch_size=4,
        chunk_batches=2, **kwargs
    )  # fmt: skip


def output(data: Path) -> Path:
    return data / "flexi" / "embeddings" / f"{MODALITY}.parquet"


def manifest(data: Path) -> dict:
    return json.loads((data / "flexi" / "manifest.json").read_text())


def test_notes_become_an_embedding_modality_holding_the_encoders_vectors_in_stay_time_order(data):
    path = data / "flexi" / "manifest.json"
    path.write_text(json.dumps(manifest(data) | {"schema_version": "1.0"}))  # as a 1.0 writer's
    before = manifest(data)
    mode = path.stat().st_mode
    assert embed_notes(data) == {
        "rows": 60, "width": 64, "path": str(output(data)), "parts": 8, "encoded": 8
    }  # fmt: skip
    table = pq.read_table(output(data))
    assert table.schema.equals(embedding_schema(64))
    assert table.schema.metadata == embedding_schema(64).metadata
    expected = notes(data).sort_values(["stay_id", "time_h"])
    assert table.column("stay_id").to_pylist() == expected["stay_id"].tolist()
    assert table.column("time_h").to_pylist() == expected["time_h"].tolist()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vectors, hashing_text(expected["text"].tolist()))
    after = manifest(data)
    assert after["modalities"] == [
        *before["modalities"],
        {"name": MODALITY, "kind": "embedding", "width": 64},
    ]
    assert after["schema_version"] == "1.1"  # the validator wants 1.1 for an embedding modality
    assert {k: v for k, v in after.items() if k not in ("modalities", "schema_version")} == {
        k: v for k, v in before.items() if k not in ("modalities", "schema_version")
    }
    assert os.listdir(output(data).parent) == [output(data).name]  # no work directory left
    assert path.stat().st_mode == mode  # rewritten, not made 0600
    assert output(data).stat().st_mode == (data / "flexi" / STAYS_FILE).stat().st_mode


def test_run_killed_mid_way_resumes_from_its_last_saved_part_and_equals_an_uninterrupted_run(
    data, tmp_path_factory, monkeypatch
):
    clean = tmp_path_factory.mktemp("clean")
    shutil.copytree(data, clean, dirs_exist_ok=True)
    monkeypatch.setenv("EMBED_CALLS", str(clean / "calls"))
    embed_notes(clean, "embed_encoders:counting")
    assert (clean / "calls").read_text().split() == ["4"] * 15

    before = (data / "flexi" / "manifest.json").read_bytes()
    calls = {"EMBED_CALLS": str(data / "calls")}
    args = ("--encoder", "embed_encoders:counting", *SIZES)
    # The 6th call (batch 5) kills the process: parts 0 and 1 (batches 0-3) are saved, batch 4's
    # vectors die with it.
    killed = fusemoe_embed(data, *args, env=calls | {"EMBED_KILL_AT": "6"})
    assert killed.returncode == -9
    assert not output(data).exists()
    assert (data / "flexi" / "manifest.json").read_bytes() == before
    assert len((data / "calls").read_text().split()) == 5
    (data / "calls").unlink()

    resumed = fusemoe_embed(data, *args, env=calls)
    assert resumed.returncode == 0, resumed.stderr
    assert (data / "calls").read_text().split() == ["4"] * 11  # batches 4-14 only
    assert "6 of 8 parts encoded now, 2 resumed" in resumed.stdout
    assert file_sha256(output(data)) == file_sha256(output(clean))
    assert manifest(data) == manifest(clean)


def test_progress_of_another_input_or_encoder_is_discarded_not_mixed_in(data, monkeypatch, capsys):
    marked = notes(data)
    marked.loc[0, "text"] += " MARK"
    marked.to_parquet(data / "notes.parquet", index=False)
    row = marked.sort_values(["stay_id", "time_h"]).index.get_loc(0)
    assert row >= 8  # so the failure comes after part 0 (rows 0-7) was saved
    with pytest.raises(EncoderError):
        embed_notes(data, "embed_encoders:nan_for_marked")
    notes(data).assign(text=notes(data)["text"].str.replace(" MARK", "")).to_parquet(
        data / "notes.parquet", index=False
    )
    monkeypatch.setenv("EMBED_CALLS", str(data / "calls"))
    embed_notes(data, "embed_encoders:counting")
    assert "starting afresh" in capsys.readouterr().out
    assert len((data / "calls").read_text().split()) == 15


def test_a_second_run_replaces_the_modality_and_its_manifest_entry(data):
    before = manifest(data)
    embed_notes(data)
    embed_notes(data, "embed_encoders:narrow")
    assert pq.read_schema(output(data)).equals(embedding_schema(16))
    assert manifest(data)["modalities"] == [
        *before["modalities"],
        {"name": MODALITY, "kind": "embedding", "width": 16},
    ]


def test_integer_stay_ids_match_the_string_stay_ids_of_stays_parquet(data):
    ids = [str(1000 + i) for i in range(12)]
    pq.write_table(pa.table({"stay_id": ids}), data / "flexi" / STAYS_FILE)
    df = notes(data)
    codes = {s: k for k, s in enumerate(sorted(df["stay_id"].unique()))}
    df["stay_id"] = df["stay_id"].map(codes) + 1000
    _write(df, data / "notes.parquet")
    embed_notes(data)
    assert sorted(set(pq.read_table(output(data)).column("stay_id").to_pylist())) == ids


def test_a_torch_tensor_from_the_encoder_is_stored_as_float32(data):
    embed_notes(data, "embed_encoders:as_torch")
    vectors = pq.read_table(output(data)).column("vector").to_numpy(zero_copy_only=False)
    texts = notes(data).sort_values(["stay_id", "time_h"])["text"].tolist()
    np.testing.assert_array_equal(np.stack(vectors), hashing_text(texts))


def _set(column: str, row: int, value) -> Callable:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({column: object}) if value is None else df
        df.loc[row, column] = value
        return df

    return edit


def _nan_time(row: int) -> Callable:
    """A NaN (not null) time, which pandas would write as null."""

    def edit(df: pd.DataFrame) -> pa.Table:
        time = df["time_h"].to_numpy(copy=True)
        time[row] = np.nan
        table = pa.Table.from_pandas(df, preserve_index=False)
        return table.set_column(table.column_names.index("time_h"), "time_h", pa.array(time))

    return edit


def _write(notes: pd.DataFrame | pa.Table, path: Path) -> None:
    pq.write_table(notes if isinstance(notes, pa.Table) else pa.Table.from_pandas(notes), path)


BAD_INPUT = {
    "missing item column": (
        lambda df: df.drop(columns="text"),
        "column 'text': required column is missing",
    ),
    "missing stay_id": (
        lambda df: df.drop(columns="stay_id"),
        "column 'stay_id': required column is missing",
    ),
    "null stay": (_set("stay_id", 8, None), "row 8, column 'stay_id': missing (null) value"),
    "no rows": (lambda df: df.iloc[:0], "no rows to encode"),
    "null item": (_set("text", 7, None), "row 7, column 'text': missing (null) item"),
    "null time": (
        lambda df: df.astype({"time_h": "Float64"}).pipe(_set("time_h", 3, pd.NA)),
        "row 3, column 'time_h': missing (null) value",
    ),
    "nan time": (_nan_time(5), "row 5, column 'time_h': time is not finite (nan h)"),
    "negative time": (_set("time_h", 4, -1.0), "row 4, column 'time_h': negative time (-1.0 h)"),
    "time as text": (
        lambda df: df.astype({"time_h": str}),
        "column 'time_h': wrong type large_string, expected float32",
    ),
    "lossy time": (_set("time_h", 2, 1e39), "row 2, column 'time_h': value 1e+39 does not fit"),
    "unknown stay": (
        _set("stay_id", 6, "nobody"),
        "row 6, column 'stay_id': stay_id 'nobody' is not in",
    ),
    "empty stay": (_set("stay_id", 1, ""), "row 1, column 'stay_id': empty stay_id"),
}


@pytest.mark.parametrize("family", BAD_INPUT)
def test_bad_input_is_one_line_naming_file_row_and_column_and_writes_nothing(data, family):
    edit, expected = BAD_INPUT[family]
    _write(edit(notes(data)), data / "notes.parquet")
    before = (data / "flexi" / "manifest.json").read_bytes()
    with pytest.raises(FlexiModalError) as info:
        embed_notes(data)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(data / "notes.parquet")), msg
    assert expected in msg, msg
    assert (data / "flexi" / "manifest.json").read_bytes() == before
    assert not (data / "flexi" / "embeddings").exists()


def test_duplicate_stay_and_time_names_both_rows(data):
    df = notes(data)
    df.loc[9, ["stay_id", "time_h"]] = df.loc[3, ["stay_id", "time_h"]].to_numpy()
    df.to_parquet(data / "notes.parquet", index=False)
    with pytest.raises(FlexiModalError, match=r"row 9, .*already has an item at .* h \(row 3\)"):
        embed_notes(data)


@pytest.mark.parametrize(
    "content, expected",
    [(b"not parquet", "not a readable Parquet file"), (None, "file not found")],
)
def test_unreadable_or_missing_input_file_is_one_line(data, content, expected):
    path = data / "notes.parquet"
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FlexiModalError, match=expected):
        embed_notes(data)
    assert not (data / "flexi" / "embeddings").exists()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vitals", "modality 'vitals' is already a series modality"),
        ("../note", "modality name '../note': use letters, digits"),
    ],
)
def test_modality_name_of_a_series_modality_or_not_a_plain_name_is_refused(data, name, expected):
    with pytest.raises(FlexiModalError, match=re.escape(expected)):
        embed(data / "notes.parquet", data / "flexi", name, HASHING, "text")
    assert not (data / "flexi" / "embeddings").exists()


@pytest.mark.parametrize("missing", ["manifest.json", STAYS_FILE])
def test_out_directory_without_manifest_or_stays_is_refused(data, missing):
    (data / "flexi" / missing).unlink()
    with pytest.raises(FlexiModalError, match=f"{missing}: file not found"):
        embed_notes(data)
    assert not (data / "flexi" / "embeddings").exists()


def test_encoder_module_failing_at_import_is_one_line(data, tmp_path, monkeypatch):
    (tmp_path / "broken_encoders.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(EncoderError) as info:
        embed_notes(data, "broken_encoders:encode")
    assert str(info.value) == (
        "encoder broken_encoders:encode: importing 'broken_encoders' raised RuntimeError: no GPU here"
    )


BAD_ENCODER = {
    "embed_encoders": "expected module:function",
    "no_such_module:encode": "cannot import module 'no_such_module'",
    "embed_encoders:missing": "module 'embed_encoders' has no attribute 'missing'",
    "embed_encoders:NOT_CALLABLE": "'NOT_CALLABLE' is not callable (type int)",
    "embed_encoders:one_dimensional": "batch 0 (rows 0..3 in (stay_id, time_h) order): returned "
    "shape (4,), expected (4, width)",
    "embed_encoders:one_row_short": "batch 0 (rows 0..3 in (stay_id, time_h) order): returned "
    "shape (3, 64), expected (4, width)",
    "embed_encoders:words": "expected floats",
    "embed_encoders:fails": "batch 0 (rows 0..3) raised FileNotFoundError: no such image:",
    "embed_encoders:inf_after_float32": "batch 0 (rows 0..3 in (stay_id, time_h) order): inf at row",
}


@pytest.mark.parametrize("encoder", BAD_ENCODER)
def test_bad_encoder_is_one_line_naming_it_and_writes_nothing(data, encoder):
    before = (data / "flexi" / "manifest.json").read_bytes()
    with pytest.raises(EncoderError) as info:
        embed_notes(data, encoder)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"encoder {encoder}: "), msg
    assert BAD_ENCODER[encoder] in msg, msg
    assert (data / "flexi" / "manifest.json").read_bytes() == before
    assert not (data / "flexi" / "embeddings").exists()


def _mark(data: Path, input_row: int) -> int:
    """Appends MARK to one note; returns its row in (stay_id, time_h) order."""
    df = notes(data)
    df.loc[input_row, "text"] += " MARK"
    df.to_parquet(data / "notes.parquet", index=False)
    return df.sort_values(["stay_id", "time_h"]).index.get_loc(input_row)


@pytest.mark.parametrize(
    "encoder, problem",
    [
        (
            "embed_encoders:nan_for_marked",
            "nan at row {input_row} (stay '{stay}', {time} h), element 5",
        ),
        ("embed_encoders:wider_for_marked", "returned width 16, but 8 for earlier batches"),
    ],
)
def test_bad_output_in_a_later_batch_names_batch_and_row_and_writes_no_output(
    data, encoder, problem
):
    input_row = int(np.flatnonzero(notes(data)["stay_id"] == "s000005")[0])
    row = _mark(data, input_row)
    stay, time = notes(data).loc[input_row, ["stay_id", "time_h"]]
    before = (data / "flexi" / "manifest.json").read_bytes()
    with pytest.raises(EncoderError) as info:
        embed_notes(data, encoder)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert f"batch {row // 4} (rows {row // 4 * 4}..{row // 4 * 4 + 3}" in msg, msg
    assert problem.format(input_row=input_row, stay=stay, time=time) in msg, msg
    assert (data / "flexi" / "manifest.json").read_bytes() == before
    assert not output(data).exists()


def test_console_script_prints_one_error_line_and_exits_1(data):
    _set("stay_id", 6, "nobody")(notes(data)).to_parquet(data / "notes.parquet", index=False)
    done = fusemoe_embed(data, "--encoder", HASHING)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: notes.parquet, row 6, ")
    assert not (data / "flexi" / "embeddings").exists()
