"""What every DVC stage shares: params, paths, atomic writes, run lineage."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path.cwd()
TRAIN_DIR = Path("models/train")  # best checkpoint's weights + model_config.json + run.json
RUN_FILE = TRAIN_DIR / "run.json"
HISTORY_FILE = Path("metrics/train_history.json")  # per-epoch curves written by train
BEST_PARAMS = Path("best_params.yaml")  # written by the tune stage, read by train when switched on


def stage_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="the params file (default params.yaml)"
    )
    return parser.parse_args()


def skip_final_gc() -> None:
    """Lets a stage process exit without the interpreter's last full garbage collections over
    every object torch, Ray and MLflow left (seconds per process, in every stage of every repro).
    gc.freeze() at exit only exempts those objects from the collector: atexit handlers have run,
    and modules are still torn down, so files and MLflow runs are closed as before."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def load_params(path: str | Path = "params.yaml", sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """The requested sections of params.yaml, validated against pipelines.config's schema and
    completed with its defaults; a bad file exits with one line naming section, key and value."""
    from pipelines.config import ConfigError, load

    try:
        return load(path, sections)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def apply_best_params(params: dict[str, Any], path: str | Path = BEST_PARAMS) -> dict[str, Any]:
    """``params`` with the tune stage's best values laid over ``model`` / ``train`` when
    ``train.use_best_params`` is on (otherwise ``params`` unchanged); the result is validated
    like params.yaml, and an error names ``path``."""
    from pipelines.config import ConfigError, validate

    if not params["train"].get("use_best_params", False):
        return params
    path = Path(path)
    if not path.is_file():
        sys.exit(
            f"error: train.use_best_params is on but {path} does not exist: run the tune stage "
            "first (dvc repro tune) or set train.use_best_params: false"
        )
    best = yaml.safe_load(path.read_text()) or {}
    if not isinstance(best, dict) or set(best) - {"model", "train"}:
        sys.exit(f"error: {path}: expected only 'model' and 'train' sections, got {sorted(best)}")
    merged = dict(params)
    for section, values in best.items():
        if not isinstance(values, dict):
            sys.exit(f"error: {path}: section '{section}' must be a mapping, got {values!r}")
        merged[section] = {**params[section], **values}
    try:
        return merged | validate({s: merged[s] for s in best})
    except ConfigError as e:
        sys.exit(f"error: {path}: {e}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes beside the target and renames, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should look like open()'s
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Moves a fully written directory into place, replacing any older one."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_hash(data_dir: str | Path) -> str:
    """One hash over the FlexiModal files: the dataset identity recorded with every run."""
    h = hashlib.sha256()
    for name in ("manifest.json", "stays.parquet", "events.parquet"):
        h.update(file_sha256(Path(data_dir) / name).encode())
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"top_k": 2}} -> {"model.top_k": 2}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def tracking_uri(mlflow_params: dict) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path is anchored at the project directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_params.get(
        "tracking_uri", "sqlite:///mlflow.db"
    )
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((ROOT / uri[len(prefix) :]).resolve())
    return uri


def read_run() -> dict:
    if not RUN_FILE.is_file():
        sys.exit(f"error: {RUN_FILE} not found: run the train stage first (dvc repro train)")
    return json.loads(RUN_FILE.read_text())
