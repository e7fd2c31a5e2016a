"""PhysioNet 2012 reader and the prepare stage: cleaning rules, bad raw input, real records."""

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml

from fusemoe.data.flexi import FlexiModalError, validate_dir, write_flexi
from fusemoe.data.physionet2012 import (
    CONTENT_DIGESTS,
    OUTCOMES_HEADER,
    content_digest,
    read_physionet2012,
)
from pipelines.prepare import main as prepare_main

REPO = Path(__file__).parents[2]
REAL = REPO.parent / "shared/data/physionet2012"


def record(rid: int, series: str = "", *, age=60, gender=1, height=-1, icu=3, weight=80.5) -> str:
    head = (
        f"Time,Parameter,Value\n00:00,RecordID,{rid}\n00:00,Age,{age}\n00:00,Gender,{gender}\n"
        f"00:00,Height,{height}\n00:00,ICUType,{icu}\n00:00,Weight,{weight}\n"
    )
    return head + series


def outcomes(rows: list[tuple]) -> str:
    return OUTCOMES_HEADER + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


def make_raw(
    root: Path,
    records: dict[int, str],
    deaths: dict[int, int] | None = None,
    los: dict[int, int] | None = None,
    tar: bool = True,
    s: str = "a",
) -> Path:
    """A raw dir in the ../shared layout: set-X.tar.gz (or set-X/) and Outcomes-X.txt."""
    root.mkdir(parents=True, exist_ok=True)
    deaths, los = deaths or {}, los or {}
    if tar:
        with tarfile.open(root / f"set-{s}.tar.gz", "w:gz") as t:
            for rid, text in sorted(records.items()):
                data = text.encode()
                info = tarfile.TarInfo(f"set-{s}/{rid}.txt")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        (root / f"set-{s}").mkdir()
        for rid, text in records.items():
            (root / f"set-{s}" / f"{rid}.txt").write_text(text)
    rows = [(rid, 10, 3, los.get(rid, 9), -1, deaths.get(rid, 0)) for rid in sorted(records)]
    (root / f"Outcomes-{s}.txt").write_text(outcomes(rows))
    return root


def good_records() -> dict[int, str]:
    """Ten stays: one per quirk of the data README, plus plain ones."""
    recs = {rid: record(rid, f"00:30,HR,{70 + rid % 7}\n01:00,Na,140\n") for rid in range(100, 110)}
    # descriptors interleaved with 00:00 measurements; later Weight rows are series values
    recs[100] = (
        "Time,Parameter,Value\n00:00,RecordID,100\n00:00,HR,88\n00:00,Age,70\n00:00,Gender,0\n"
        "00:00,Height,170\n00:00,Weight,75\n00:00,ICUType,2\n00:00,Weight,76\n05:00,Weight,77\n"
        "05:00,pH,7.3\n"
    )
    # repeated measurements at one time -> mean; -1 and Temp in Fahrenheit-zero dropped
    recs[101] = record(101, "01:00,HR,80\n01:00,HR,90\n02:00,DiasABP,-1\n02:00,Temp,-17.8\n")
    recs[102] = record(102, "01:00,,2.9\n01:00,HR,60\n")  # set-c empty parameter name
    recs[103] = record(103)  # descriptors only: kept, no series modality
    recs[104] = record(104, "03:00,pH,735\n03:00,PaO2,90\n", height=462)  # scale error, odd height
    return recs


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    raw = make_raw(
        tmp_path_factory.mktemp("raw"),
        good_records(),
        deaths={100: 1, 105: 1, 106: 1},
        los={103: -1, 104: 3},
    )
    return read_physionet2012(raw, sets=("a",), verify=False)


def _events_of(events: pa.Table, stay: str) -> list[tuple]:
    df = events.to_pandas()
    df = df[df["stay_id"] == stay]
    return list(
        zip(
            df["modality"].astype(str),
            df["variable"].astype(str),
            df["time_h"].astype(float).round(3),
            df["value"].astype(float).round(3),
            strict=True,
        )
    )


def test_interleaved_descriptors_use_the_first_at_midnight_and_later_weights_are_series(parsed):
    stays, events, _ = parsed
    s = stays.set_index("stay_id").loc["100"]
    assert (s["Age"], s["Gender"], s["Height"], s["Weight"]) == (70, 0, 170, 75)
    assert (s["ICU_CCU"], s["ICU_CSRU"], s["ICU_MICU"], s["ICU_SICU"]) == (0, 1, 0, 0)
    assert sorted(_events_of(events, "100")) == [
        ("respiratory", "pH", 5.0, 7.3),
        ("vitals", "HR", 0.0, 88.0),
        ("vitals", "Weight", 0.0, 76.0),
        ("vitals", "Weight", 5.0, 77.0),
    ]


def test_repeated_values_are_averaged_and_negative_or_implausible_values_dropped(parsed):
    _, events, manifest = parsed
    assert _events_of(events, "101") == [("vitals", "HR", 1.0, 85.0)]
    c = manifest["cleaning"]
    assert c["repeated_rows_merged"] == 1 and c["repeated_groups"] == 1
    assert c["implausible_dropped"] == {"DiasABP": 1, "Temp": 1, "pH": 1}
    assert _events_of(events, "104") == [("respiratory", "PaO2", 3.0, 90.0)]


def test_empty_parameter_rows_are_dropped_and_counted(parsed):
    _, events, manifest = parsed
    assert _events_of(events, "102") == [("vitals", "HR", 1.0, 60.0)]
    assert manifest["cleaning"]["empty_parameter_rows"] == 1
    assert manifest["cleaning"]["records_with_interleaved_descriptors"] == 1


def test_stay_with_descriptors_only_is_kept_and_counted(parsed, tmp_path):
    stays, events, manifest = parsed
    assert "103" in set(stays["stay_id"]) and _events_of(events, "103") == []
    assert manifest["cleaning"]["stays_without_series_ids"] == ["103"]
    written = write_flexi(tmp_path / "out", stays, events, manifest)
    assert written["counts"]["stays"] == 10
    assert written["missingness"]["modality"]["labs"]["all"] == pytest.approx(0.5)


def test_unknown_descriptors_become_null_and_labels_follow_outcomes(parsed):
    stays, _, manifest = parsed
    s = stays.set_index("stay_id")
    assert s["Height"].isna().sum() == 9  # eight -1 and one implausible 462 cm
    assert manifest["cleaning"]["static_implausible_nulled"]["Height"] == 1
    assert s.loc["100", "ihm"] == 1 and s.loc["101", "ihm"] == 0
    assert s["los_days"].isna().tolist() == [r == "103" for r in s.index]
    assert s.loc["104", "los_gt7"] == 0 and s.loc["101", "los_gt7"] == 1
    assert s["los_gt7"].isna().sum() == 1


def test_extracted_directory_and_tarball_give_identical_tables(tmp_path, parsed):
    raw = make_raw(
        tmp_path / "raw",
        good_records(),
        deaths={100: 1, 105: 1, 106: 1},
        los={103: -1, 104: 3},
        tar=False,
    )
    stays, events, manifest = read_physionet2012(raw, sets=("a",), verify=False)
    assert stays.equals(parsed[0])
    assert events.equals(parsed[1])
    assert manifest["source_hashes"] == parsed[2]["source_hashes"]


@pytest.fixture
def one_record_chunks(monkeypatch):
    """Parse every record on its own; returns the number of records of each parse call."""
    from fusemoe.data import physionet2012

    calls, parse = [], physionet2012._parse_set

    def spy(label, files, cleaning):
        calls.append(len(files))
        return parse(label, files, cleaning)

    monkeypatch.setattr(physionet2012, "PARSE_CHUNK_BYTES", 1)
    monkeypatch.setattr(physionet2012, "_parse_set", spy)
    return calls


def test_a_set_is_parsed_in_bounded_chunks_with_the_same_tables_as_one_pass(
    tmp_path, parsed, one_record_chunks
):
    raw = make_raw(
        tmp_path / "raw", good_records(), deaths={100: 1, 105: 1, 106: 1}, los={103: -1, 104: 3}
    )
    stays, events, manifest = read_physionet2012(raw, sets=("a",), verify=False)
    assert one_record_chunks == [1] * len(good_records())  # memory follows a chunk, not the set
    assert stays.equals(parsed[0])
    assert events.equals(parsed[1])
    assert manifest == parsed[2]


def test_bad_record_in_a_later_chunk_is_rejected_with_its_own_file_and_line(
    tmp_path, one_record_chunks
):
    msg = _bad(tmp_path, record(108, "00:30,HR,70\n00:40,Pulse,71\n"), rid=108)
    assert msg.endswith("108.txt, record 108, line 9, column 'Parameter': unknown variable 'Pulse'")
    assert one_record_chunks == [1] * 9  # found in the 9th chunk: lines count from its own file


def test_content_digest_follows_the_readme_recipe():
    files = [("b.txt", b"2\n"), ("a.txt", b"1\n")]
    text = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files))
    assert content_digest(files) == hashlib.sha256(text.encode()).hexdigest()


def test_modified_copy_fails_digest_verification(tmp_path):
    raw = make_raw(tmp_path / "raw", good_records(), deaths={100: 1})
    with pytest.raises(FlexiModalError, match=r"set-a.tar.gz: content digest .* does not match"):
        read_physionet2012(raw, sets=("a",))


def _bad(tmp_path, text: str, rid: int = 105, **kw) -> str:
    recs = good_records()
    recs[rid] = text
    raw = make_raw(tmp_path / "raw", recs, **kw)
    with pytest.raises(FlexiModalError) as info:
        read_physionet2012(raw, sets=("a",), verify=False)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_truncated_record_is_rejected_with_file_record_and_line(tmp_path):
    msg = _bad(tmp_path, record(105, "00:30,HR,70\n01:00,H"))
    assert msg.endswith(
        "set-a.tar.gz:105.txt, record 105, line 9: expected 3 fields Time,Parameter,Value, got 2: "
        "'01:00,H' (truncated or garbled record)"
    )


def test_record_truncated_inside_the_descriptors_is_rejected(tmp_path):
    msg = _bad(tmp_path, "Time,Parameter,Value\n00:00,RecordID,105\n00:00,Age,60\n")
    assert msg.endswith(
        "105.txt, record 105: missing descriptor 'Gender' at 00:00 (truncated or garbled record)"
    )


def test_garbled_record_without_header_is_rejected(tmp_path):
    msg = _bad(tmp_path, "\x00\x17garbage\n")
    assert msg.endswith(
        "105.txt, record 105, line 1: missing header 'Time,Parameter,Value' (garbled record)"
    )


def test_unknown_variable_is_rejected_with_line(tmp_path):
    msg = _bad(tmp_path, record(105, "00:30,HR,70\n00:40,Pulse,71\n"))
    assert msg.endswith("105.txt, record 105, line 9, column 'Parameter': unknown variable 'Pulse'")


def test_non_numeric_value_is_rejected_with_line(tmp_path):
    msg = _bad(tmp_path, record(105, "00:30,HR,seventy\n"))
    assert msg.endswith("105.txt, record 105, line 8, column 'Value': non-numeric value 'seventy'")


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
def test_nan_or_infinite_value_is_rejected_with_line(tmp_path, value):
    msg = _bad(tmp_path, record(105, f"00:30,HR,{value}\n"))
    assert msg.endswith(f"105.txt, record 105, line 8, column 'Value': non-finite value '{value}'")


def test_negative_time_is_rejected_with_line(tmp_path):
    msg = _bad(tmp_path, record(105, "-01:00,HR,70\n"))
    assert msg.endswith("105.txt, record 105, line 8: negative time '-01:00'")


def test_record_with_no_observations_at_all_is_rejected(tmp_path):
    msg = _bad(tmp_path, "Time,Parameter,Value\n")
    assert msg.endswith("105.txt, record 105: record has no observations at all")


def test_duplicated_stay_id_in_outcomes_is_rejected_with_line(tmp_path):
    raw = make_raw(tmp_path / "raw", good_records())
    text = (raw / "Outcomes-a.txt").read_text()
    (raw / "Outcomes-a.txt").write_text(text + text.splitlines()[1] + "\n")
    with pytest.raises(FlexiModalError) as info:
        read_physionet2012(raw, sets=("a",), verify=False)
    assert str(info.value).endswith(
        "Outcomes-a.txt, record 100, line 12: duplicated stay id 100 (first on line 2)"
    )


def test_stay_id_in_two_sets_is_rejected(tmp_path):
    raw = make_raw(tmp_path / "raw", good_records())
    make_raw(raw, {100: record(100, "00:30,HR,70\n")}, s="b")
    with pytest.raises(
        FlexiModalError, match=r"set-b.tar.gz:100.txt, record 100: duplicated stay id 100"
    ):
        read_physionet2012(raw, sets=("a", "b"), verify=False)


def test_label_outside_its_domain_is_rejected_with_line(tmp_path):
    raw = make_raw(tmp_path / "raw", good_records(), deaths={104: 2})
    with pytest.raises(FlexiModalError) as info:
        read_physionet2012(raw, sets=("a",), verify=False)
    assert str(info.value).endswith(
        "Outcomes-a.txt, record 104, line 6, column 'In-hospital_death': "
        "In-hospital_death 2 is outside its domain {0,1}"
    )


def test_truncated_tarball_is_rejected(tmp_path):
    raw = make_raw(tmp_path / "raw", good_records())
    data = (raw / "set-a.tar.gz").read_bytes()
    (raw / "set-a.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlexiModalError, match=r"set-a.tar.gz: truncated or corrupt archive"):
        read_physionet2012(raw, sets=("a",), verify=False)


# ----------------------------------------------------------------------------- prepare stage


def _params(tmp_path: Path, **data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"out_dir": str(tmp_path / "out"), **data}}))
    return path


def test_prepare_exits_nonzero_with_one_line_error_and_writes_nothing(tmp_path):
    recs = good_records()
    recs[105] = record(105, "00:30,HR,abc\n")
    raw = make_raw(tmp_path / "raw", recs)
    params = _params(tmp_path, source="physionet2012", download_dir=str(raw), verify_digests=False)
    env = {"PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--params", str(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "record 105, line 8" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


def test_prepare_builds_physionet_layout_from_the_download_dir_only(tmp_path, monkeypatch, capsys):
    raw = make_raw(tmp_path / "raw", good_records(), deaths={100: 1, 105: 1, 106: 1})
    # The mirror settings are the download stage's: prepare reads the (DVC-tracked) copy alone.
    monkeypatch.setenv("FUSEMOE_DATA_DIR", "/does/not/exist")
    params = _params(
        tmp_path,
        source="physionet2012",
        raw_dir="/does/not/exist",
        download_dir=str(raw),
        verify_digests=False,
        split=[0.6, 0.2, 0.2],
        seed=1,
    )
    # prepare reads only set-a..c by default; give it the other two sets as empty-of-trouble copies
    for s in ("b", "c"):
        make_raw(raw, {200 + ord(s): record(200 + ord(s), "00:30,HR,70\n")}, s=s)
    assert prepare_main(["--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prepare: physionet2012 -> ") and "12 stays" in out
    assert validate_dir(tmp_path / "out")["counts"]["stays"] == 12
    # the parsed events waited beside the output and are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "params.yaml", "raw"]


def test_prepare_flexi_source_validates_user_files_and_assigns_missing_splits(tmp_path, capsys):
    from fusemoe.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "mine", num_stays=200, seed=0)
    import pyarrow.parquet as pq

    stays = pq.read_table(tmp_path / "mine" / "stays.parquet").drop_columns(["split"])
    pq.write_table(stays, tmp_path / "mine" / "stays.parquet")
    params = _params(
        tmp_path, source="flexi", flexi_dir=str(tmp_path / "mine"), split=[0.8, 0.1, 0.1]
    )
    assert prepare_main(["--params", str(params)]) == 0
    manifest = validate_dir(tmp_path / "out")
    assert manifest["counts"]["splits"] == {"train": 160, "val": 20, "test": 20}

    events = pq.read_table(tmp_path / "mine" / "events.parquet")
    events = events.set_column(4, "value", events.column("value").cast(pa.string()))
    pq.write_table(events, tmp_path / "mine" / "events.parquet")
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 'mine' / 'events.parquet'}, column 'value': wrong type string, "
        "expected float\n"
    )  # (float64 would be cast losslessly: tests/unit/test_flexi_validation.py)
    assert validate_dir(tmp_path / "out")["counts"]["stays"] == 200  # old output untouched


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")
def test_real_records_parse_with_expected_descriptors_and_values(tmp_path):
    wanted = ["132539", "132540", "132541", "132543", "132545", "140501"]
    raw = tmp_path / "raw"
    (raw / "set-a").mkdir(parents=True)
    with tarfile.open(REAL / "set-a.tar.gz") as tar:
        files = [(m.name.split("/")[1], tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert content_digest(files) == CONTENT_DIGESTS["a"]
    for name, data in files:
        if name.removesuffix(".txt") in wanted:
            (raw / "set-a" / name).write_bytes(data)
    lines = (REAL / "Outcomes-a.txt").read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in wanted]
    (raw / "Outcomes-a.txt").write_text("\n".join(keep) + "\n")
    stays, events, manifest = read_physionet2012(raw, sets=("a",), verify=False)
    s = stays.set_index("stay_id")
    assert list(s.index) == wanted
    assert (s.loc["132539", "Age"], s.loc["132539", "Gender"], s.loc["132539", "ICU_SICU"]) == (
        54,
        0,
        1,
    )
    assert pd.isna(s.loc["132539", "Height"])
    hr = [e for e in _events_of(events, "132539") if e[1] == "HR"]
    assert hr[:2] == [("vitals", "HR", 0.117, 73.0), ("vitals", "HR", 0.617, 77.0)]
    assert manifest["cleaning"]["stays_without_series_ids"] == ["140501"]


# ----------------------------------------------------------------------------- download stage


def test_download_copies_a_mirror_only_when_its_digests_match(tmp_path, monkeypatch):
    from pipelines.download import fetch

    monkeypatch.delenv("FUSEMOE_DATA_DIR", raising=False)
    mirror = tmp_path / "mirror"
    for i, s in enumerate("abc"):  # extracted set-X/ folders, not the published records
        make_raw(mirror, {300 + i: record(300 + i, "00:30,HR,70\n")}, tar=False, s=s)
    dest = tmp_path / "raw" / "p12"
    data = {"source": "physionet2012", "raw_dir": str(mirror), "download_dir": str(dest)}
    with pytest.raises(FlexiModalError, match=f"{mirror}/set-a: content digest"):
        fetch(data)
    assert list((tmp_path / "raw").iterdir()) == []  # nothing kept, no temp dir left
    assert "(digests not checked)" in fetch({**data, "verify_digests": False})
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [f"set-{s}" for s in "abc"] + [f"Outcomes-{s}.txt" for s in "abc"]
    )
    assert (dest / "set-b" / "301.txt").read_text() == (mirror / "set-b" / "301.txt").read_text()


def test_each_p12_stay_is_its_own_subject(parsed):
    stays, _, _ = parsed
    assert stays["subject_id"].tolist() == stays["stay_id"].tolist()
