"""benchmarks/gpu_check.sh on a machine without CUDA: one clear line, non-zero, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gpu_check: no CUDA device visible to {sys.executable} (torch.cuda.is_available() is "
        "False); run this on a CUDA machine"
    ]
    assert not (tmp_path / "out").exists()
