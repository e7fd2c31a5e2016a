"""The download and prepare stages through real `dvc` in temp copies of the project.

Where the raw data come from (a local mirror, or an HTTP server on 127.0.0.1 standing in for
PhysioNet: no test reaches the internet), their content checks, which inputs DVC tracks, and the
stage launcher. Only the cheap stages run (download, prepare on a few synthetic stays).
"""

from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from project_copy import commit_all, copy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REAL = Path(os.environ.get("FUSEMOE_DATA_DIR") or REPO.parent / "shared/data/physionet2012")
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")
UP_TO_DATE = "Data and pipelines are up to date."
RAW_FILES = sorted(
    f"{kind}-{s}{ext}" for s in "abc" for kind, ext in (("set", ".tar.gz"), ("Outcomes", ".txt"))
)


def make_project(work: Path, **data) -> tuple[Path, dict]:
    """A git repo holding the project's tracked and unignored files, `data` laid over params."""
    copy_project(work, drop=("dvc.lock",))
    set_data(work, **data)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(work),
    }
    env.pop("FUSEMOE_DATA_DIR", None)
    commit_all(work, env)
    return work, env


def set_data(work: Path, **data) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"].update(data)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(work: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}")
    return proc


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


NO_MIRROR = {"raw_dir": "/nonexistent/physionet2012"}
TINY_SYNTHETIC = {"source": "synthetic", "synthetic": {"num_stays": 60, "seed": 0}}


# ----------------------------------------------------------------------------- download


@needs_real
def test_download_stage_fetches_the_physionet_files_over_http_and_verifies_them(tmp_path):
    with serve(REAL) as url:
        work, env = make_project(tmp_path / "p", **NO_MIRROR, physionet_url=url)
        proc = dvc(work, env, "repro", "download")
    out = proc.stdout + proc.stderr
    assert f"fetching {url}" in out and "content digests verified" in out, out
    assert "set-a.tar.gz" in proc.stderr  # the progress bars
    got = work / "data/raw/physionet2012"
    assert sorted(p.name for p in got.iterdir()) == RAW_FILES
    for name in RAW_FILES:
        assert (got / name).read_bytes() == (REAL / name).read_bytes(), name
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["download"]["outs"][0]["path"] == "data/raw/physionet2012"
    assert UP_TO_DATE in dvc(work, env, "status", "download").stdout


def _corrupt_outcomes(dst: Path) -> str:
    text = (REAL / "Outcomes-b.txt").read_text()
    (dst / "Outcomes-b.txt").write_text(text.replace("\n", "\n ", 1))
    return "Outcomes-b.txt: SHA-256 does not match"


def _corrupt_record(dst: Path) -> str:
    """set-c with one changed value in one record (a valid archive with other content)."""
    with (
        tarfile.open(REAL / "set-c.tar.gz") as old,
        tarfile.open(dst / "set-c.tar.gz", "w:gz") as new,
    ):
        changed = False
        for member in old:
            if not member.isfile():
                new.addfile(member)
                continue
            data = old.extractfile(member).read()
            if not changed and b",HR," in data:
                data, changed = data.replace(b",HR,", b",HR,1", 1), True
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))
    return "set-c.tar.gz: content digest"


@needs_real
@pytest.mark.parametrize("corrupt", [_corrupt_outcomes, _corrupt_record])
def test_a_corrupted_file_served_is_a_digest_error_and_nothing_is_written(tmp_path, corrupt):
    served = tmp_path / "served"
    served.mkdir()
    expected = corrupt(served)
    for name in RAW_FILES:
        if not (served / name).exists():
            (served / name).symlink_to(REAL / name)
    with serve(served) as url:
        work, env = make_project(tmp_path / "p", **NO_MIRROR, physionet_url=url)
        proc = dvc(work, env, "repro", "download", ok=False)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and f"{url}{expected}" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((work / "data/raw").iterdir()) == []


def test_without_mirror_or_network_repro_stops_at_the_download_with_one_clear_line(tmp_path):
    url = closed_port_url()
    work, env = make_project(tmp_path / "p", **NO_MIRROR, physionet_url=url)
    proc = dvc(work, env, "repro", ok=False)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert f"{url}set-a.tar.gz: download failed (cannot connect)" in lines[0]
    assert "data.raw_dir" in lines[0] and "FUSEMOE_DATA_DIR" in lines[0]
    assert "unexpected error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "Running stage 'prepare'" not in proc.stdout
    assert list((work / "data/raw").iterdir()) == []


@needs_real
def test_a_local_mirror_is_copied_instead_of_the_network(tmp_path):
    offline = closed_port_url()
    work, env = make_project(tmp_path / "p", raw_dir=str(REAL), physionet_url=offline)
    out = dvc(work, env, "repro", "download").stdout
    assert f"from the local mirror {REAL}" in out and "content digests verified" in out
    got = work / "data/raw/physionet2012"
    assert sorted(p.name for p in got.iterdir()) == RAW_FILES
    # FUSEMOE_DATA_DIR names the mirror instead of data.raw_dir (here: none, i.e. download)
    set_data(work, raw_dir="")
    out = dvc(work, {**env, "FUSEMOE_DATA_DIR": str(REAL)}, "repro", "download").stdout
    assert f"from the local mirror {REAL}" in out
    missing = dvc(
        work, {**env, "FUSEMOE_DATA_DIR": "/nowhere"}, "repro", "-f", "download", ok=False
    )
    assert error_lines(missing) == ["error: FUSEMOE_DATA_DIR=/nowhere: directory not found"]


# ----------------------------------------------------------------------------- other sources


@pytest.fixture(scope="module")
def synthetic_project(tmp_path_factory):
    """Synthetic source with neither a mirror nor a network: prepared once, status clean."""
    work, env = make_project(
        tmp_path_factory.mktemp("syn") / "p",
        **TINY_SYNTHETIC,
        **NO_MIRROR,
        physionet_url=closed_port_url(),
    )
    first = dvc(work, env, "repro", "prepare")
    return work, env, first


def test_synthetic_source_needs_no_physionet_files(synthetic_project):
    work, env, first = synthetic_project
    assert "data.source is synthetic, nothing to fetch" in first.stdout
    assert (work / "data/processed/manifest.json").is_file()
    assert UP_TO_DATE in dvc(work, env, "status", "prepare").stdout


def test_flexi_source_needs_no_physionet_files_and_its_files_are_a_dvc_input(tmp_path):
    from fusemoe.data.synthetic import write_synthetic

    mine = tmp_path / "mine"
    write_synthetic(mine, num_stays=60, seed=0)
    work, env = make_project(
        tmp_path / "p",
        source="flexi",
        flexi_dir=str(mine),
        **NO_MIRROR,
        physionet_url=closed_port_url(),
    )
    dvc(work, env, "repro", "prepare")
    assert UP_TO_DATE in dvc(work, env, "status", "prepare").stdout
    write_synthetic(mine, num_stays=60, seed=1)  # the user's files change, params do not
    status = dvc(work, env, "status", "prepare").stdout
    assert "prepare:" in status and f"modified:           {mine}" in status, status


def test_untracked_python_caches_and_editor_files_do_not_change_stage_hashes(synthetic_project):
    work, env, _ = synthetic_project
    tracked = subprocess.run(
        ["git", "ls-files", "fusemoe/data"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "fusemoe/data")
    assert dep["nfiles"] == len(tracked)  # running prepare wrote __pycache__ there
    junk = [
        work / "fusemoe/data/__pycache__/extra.cpython-311.pyc",
        work / "fusemoe/data/.flexi.py.swp",
        work / "fusemoe/data/flexi.py~",
    ]
    for path in junk:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"junk")
    try:
        assert UP_TO_DATE in dvc(work, env, "status", "prepare").stdout
    finally:
        for path in junk:
            path.unlink()


def test_readme_dvc_commands_run_the_project_python_without_the_venv_on_path(
    synthetic_project, tmp_path
):
    """`.venv/bin/dvc repro` and `dvc exp run -S` with a decoy `python` first on PATH."""
    work, env, _ = synthetic_project
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for name in ("python", "python3"):
        (decoy / name).write_text("#!/bin/sh\necho decoy python >&2\nexit 97\n")
        (decoy / name).chmod(0o755)
    venv = work / ".venv"
    venv.symlink_to(BIN.parent)  # as `make install` leaves it
    try:
        for cmd in (["repro", "-f", "prepare"], ["exp", "run", "-S", "data.seed=1", "prepare"]):
            proc = subprocess.run(
                [".venv/bin/dvc", *cmd],
                cwd=work,
                env={**env, "PATH": f"{decoy}:/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, (cmd, proc.stdout[-2000:] + proc.stderr[-2000:])
            assert "decoy python" not in proc.stderr, cmd
            assert "Running stage 'prepare'" in proc.stdout, cmd
    finally:
        venv.unlink()
