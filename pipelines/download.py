"""DVC stage `download`: the PhysioNet 2012 raw files -> `data.download_dir`, content-verified.

`python -m pipelines.download [--params params.yaml]` reads only the `data` section. The files come
from the first of:
- a local mirror: env FUSEMOE_DATA_DIR (must exist when set), else `data.raw_dir` when that
  directory exists (default ../shared/data/physionet2012); it is copied, not linked, so the
  pipeline's input is the DVC-tracked copy;
- `data.physionet_url` (default PhysioNet's challenge-2012 files), fetched with a progress bar.
Either way each set's record digest and each Outcomes SHA-256 must match the published ones
(`data.verify_digests: false` accepts a modified copy) before the directory is renamed into place,
so a failed or corrupt fetch leaves nothing behind. Sources other than physionet2012 need no raw
files: the directory then holds only a note saying so, and nothing is read or fetched.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from fusemoe.data.flexi import FlexiModalError
from fusemoe.data.physionet2012 import (
    BASE_URL,
    SETS,
    DownloadError,
    download_physionet2012,
    verify_raw_dir,
)
from pipelines.common import load_params, replace_dir, stage_args

DEFAULT_DIR = "data/raw/physionet2012"
NOTE = "NOT_NEEDED.txt"
MIRROR_ENV = "FUSEMOE_DATA_DIR"


def local_mirror(data: dict) -> Path | None:
    """The mirror to copy from: FUSEMOE_DATA_DIR (an error when missing), else an existing raw_dir."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        if not Path(env).is_dir():
            raise FlexiModalError(f"{MIRROR_ENV}={env}", "directory not found")
        return Path(env)
    raw_dir = str(data.get("raw_dir") or "")
    return Path(raw_dir) if raw_dir and Path(raw_dir).is_dir() else None


def copy_mirror(mirror: Path, dest: Path, sets: tuple[str, ...] = SETS) -> None:
    """Copies each set (extracted folder or tarball) and its Outcomes file from `mirror`."""
    for s in sets:
        folder, tarball = mirror / f"set-{s}", mirror / f"set-{s}.tar.gz"
        if folder.is_dir():
            shutil.copytree(folder, dest / folder.name)
        elif tarball.is_file():
            shutil.copyfile(tarball, dest / tarball.name)
        else:
            raise FlexiModalError(mirror, f"neither set-{s}/ nor set-{s}.tar.gz found")
        outcomes = mirror / f"Outcomes-{s}.txt"
        if not outcomes.is_file():
            raise FlexiModalError(outcomes, "file not found")
        shutil.copyfile(outcomes, dest / outcomes.name)


def fill(data: dict, dest: Path) -> str:
    """Puts the P12 files in `dest` from a mirror or the URL; returns where they came from."""
    mirror = local_mirror(data)
    if mirror is not None:
        print(f"download: copying the PhysioNet 2012 files from the local mirror {mirror}")
        copy_mirror(mirror, dest)
        return str(mirror)
    url = str(data.get("physionet_url") or BASE_URL)
    raw_dir = data.get("raw_dir") or "(data.raw_dir empty)"
    print(f"download: no local mirror at {raw_dir}; fetching {url}")
    try:
        download_physionet2012(dest, url)
    except DownloadError as e:
        raise DownloadError(
            str(e),
            f"no local mirror at {raw_dir}: set data.raw_dir or {MIRROR_ENV} to a directory "
            "with set-{a,b,c}.tar.gz and Outcomes-{a,b,c}.txt, "
            "or data.physionet_url to a reachable copy",
        ) from None
    return url


def fetch(data: dict) -> str:
    """Fills `data.download_dir` for `data.source`, all or nothing; returns a one-line summary."""
    dest = Path(data.get("download_dir") or DEFAULT_DIR)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        source = data.get("source", "physionet2012")
        if source == "physionet2012":
            where = fill(data, tmp)
            verified = bool(data.get("verify_digests", True))
            if verified:
                verify_raw_dir(tmp, where=where)
            check = "content digests verified" if verified else "digests not checked"
            summary = f"download: PhysioNet 2012 from {where} -> {dest} ({check})"
        else:
            note = f"data.source is {source}: the PhysioNet 2012 files are not used.\n"
            (tmp / NOTE).write_text(note)
            summary = f"download: data.source is {source}, nothing to fetch"
        replace_dir(tmp, dest)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    args = stage_args(__doc__.splitlines()[0])
    data = load_params(args.params, ("data",))["data"]
    try:
        print(fetch(data))
    except FlexiModalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
