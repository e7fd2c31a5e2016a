"""Where runs live when the workers are on other machines: pyarrow URIs, the dataset upload, and
the check that the tracking store is reachable from them.

`ray.storage_path` is a local path or any pyarrow URI (`s3://bucket/prefix`, optionally with
`?endpoint_override=http://host:port&region=...`; without it the endpoint comes from
AWS_ENDPOINT_URL and the keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Ray Train and
Tune accept the same string, so markers and ids written here sit beside Ray's own files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from pyarrow import fs as pafs

from fusemoe.data import location

# The FlexiModal files; manifest.json goes last, so its presence means the upload is complete.
DATASET_FILES = ("stays.parquet", "events.parquet", "manifest.json")
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")


def is_remote(uri: str) -> bool:
    """True for a URI other than file:// (s3://, gs://, ...); a plain path is local."""
    scheme = urlsplit(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # len > 1: a Windows drive letter is a path


def resolve(uri: str | Path) -> str:
    """A local path made absolute (every process then means the same place); URIs unchanged."""
    return str(uri) if is_remote(str(uri)) else str(Path(uri).resolve())


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended before any `?query` (the endpoint settings)."""
    base, sep, query = str(uri).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return location.resolve(uri)  # the one URI -> (filesystem, path) rule, shared with the readers


def exists(uri: str) -> bool:
    filesystem, path = _fs(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    filesystem, path = _fs(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    filesystem, path = _fs(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode())


def delete_dir(uri: str) -> None:
    filesystem, path = _fs(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_dir(path)


def dataset_files(data_dir: str | Path) -> list[str]:
    """The files of a local FlexiModal directory, manifest.json last: the two tables and the
    embedding modalities' files (`embeddings/<modality>.parquet`, listed in the manifest)."""
    manifest = json.loads((Path(data_dir) / DATASET_FILES[-1]).read_text())
    extra = [f for f in manifest.get("files", {}) if f not in DATASET_FILES]
    return [*DATASET_FILES[:-1], *extra, DATASET_FILES[-1]]


def dataset_uri(data_dir: str | Path, storage_path: str, data_hash: str) -> str:
    """Where the workers read the prepared dataset: `data_dir` itself when storage is local,
    else `<storage>/datasets/<data_hash>`, uploaded once (content-addressed: skipped if there)."""
    if not is_remote(storage_path):
        return resolve(data_dir)
    dest = join(storage_path, "datasets", data_hash)
    if exists(join(dest, DATASET_FILES[-1])):
        return dest
    filesystem, path = _fs(dest)
    filesystem.create_dir(path, recursive=True)
    for name in dataset_files(data_dir):
        filesystem.create_dir(f"{path}/{name}".rsplit("/", 1)[0], recursive=True)
        with (
            open(Path(data_dir) / name, "rb") as src,
            filesystem.open_output_stream(f"{path}/{name}") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def cluster_address(ray_params: dict) -> str | None:
    """The Ray cluster this process submits to (RAY_ADDRESS wins over ray.address); None = local."""
    return os.environ.get("RAY_ADDRESS") or ray_params.get("address") or None


def require_reachable_tracking(tracking_uri: str, address: str | None) -> None:
    """Refuses a tracking store in a local file when the workers run on a cluster: they would
    write into files on their own machines (or fail) instead of the run the driver created."""
    if address and urlsplit(tracking_uri).scheme in LOCAL_TRACKING_SCHEMES:
        raise ValueError(
            f"MLflow tracking URI {tracking_uri} is a local file, but Ray runs on the cluster at "
            f"{address}, whose workers cannot reach it: set MLFLOW_TRACKING_URI to a tracking "
            "server (http://...)"
        )
