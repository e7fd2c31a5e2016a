"""A throwaway copy of the project for tests that run `dvc` on it, in a git repo of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Committed outputs of the last `make repro`: a test's own run must produce them afresh.
PIPELINE_OUTPUTS = ("dvc.lock", "metrics.json", "best_params.yaml")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]


def copy_project(dst: Path, drop: tuple[str, ...] = PIPELINE_OUTPUTS) -> Path:
    """Copies the project's tracked and unignored files to ``dst``, without ``drop``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    for name in drop:
        (dst / name).unlink(missing_ok=True)
    return dst


def commit_all(work: Path, env: dict, message: str = "x") -> None:
    """`git init` (once) and a commit of everything: DVC experiments need a commit."""
    if not (work / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(
        [*GIT, "commit", "-qm", message], cwd=work, env=env, check=True, capture_output=True
    )


def local_env(work: Path, tmp: Path) -> dict:
    """The environment of a `dvc repro` on the copy: the venv's tools first, the copy's code,
    a SQLite tracking store in ``tmp``, and an embedded Ray (never a cluster from the shell)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(work),
    }
    env.pop("RAY_ADDRESS", None)
    return env
