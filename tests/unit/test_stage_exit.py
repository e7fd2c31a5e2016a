"""A stage process skips the interpreter's last full garbage collections (pipelines.common.
skip_final_gc) and still ends like any other: exit handlers run, open files are flushed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STAGE = """
import atexit, gc, sys
from pathlib import Path
out = Path(sys.argv[1])
# Registered before the stage's hook, so it runs after it: what the final collections would see.
atexit.register(lambda: (out / "frozen").write_text(str(gc.get_freeze_count())))
from pipelines.common import skip_final_gc
skip_final_gc()
log = open(out / "unclosed.txt", "w")  # a module-level file the stage never closes
log.write("x" * 100_000)
atexit.register(lambda: (out / "handler").write_text("ran"))  # e.g. MLflow's own exit handler
"""


def test_a_stage_exits_with_its_objects_frozen_and_still_flushes_and_runs_exit_handlers(
    tmp_path,
):
    proc = subprocess.run(
        [sys.executable, "-c", STAGE, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert int((tmp_path / "frozen").read_text()) > 0  # the final collections skip them
    assert (tmp_path / "handler").read_text() == "ran"
    assert (tmp_path / "unclosed.txt").read_text() == "x" * 100_000
