"""A prepare run killed with SIGKILL leaves its spill of parsed events beside the output; the next
run removes it, and never the spill of a run still going."""

import os
import subprocess
import sys

from pipelines.prepare import SPILL_PREFIX, remove_stale_spills


def test_the_spill_of_a_killed_prepare_is_removed_and_a_running_ones_kept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{SPILL_PREFIX}{gone.pid}-k3x9"
    stale.mkdir()
    (stale / "chunk-0.arrow").write_bytes(b"\0" * 10)
    running = tmp_path / f"{SPILL_PREFIX}{os.getpid()}-a1b2"
    running.mkdir()
    output = tmp_path / "processed"
    output.mkdir()
    remove_stale_spills(tmp_path)
    assert not stale.exists()
    assert running.exists() and output.exists()
