"""Where a FlexiModal directory lives: a local path or any pyarrow filesystem URI.

``s3://bucket/datasets/abc?endpoint_override=http://127.0.0.1:9000&scheme=http`` names a directory on
an S3-compatible store (credentials come from the environment, as pyarrow reads them); a plain path
or ``file://`` URI a local one. Workers of a cluster open the dataset through this, so it need not
exist on the driver's disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, directory path inside it) for a local path or a pyarrow URI."""
    text = str(location)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def read_text(location: str | os.PathLike, name: str) -> str | None:
    """The text of file ``name`` in the directory, or None when it does not exist."""
    fs, path = resolve(location)
    file = f"{path}/{name}"
    if fs.get_file_info(file).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(file) as f:
        return f.read().decode("utf-8")


def file_name(location: str | os.PathLike, name: str) -> str:
    """How error messages name file ``name`` of the directory (a URI without its query)."""
    text = str(location)
    if "://" not in text:
        return str(Path(text) / name)
    return f"{text.split('?', 1)[0].rstrip('/')}/{name}"
