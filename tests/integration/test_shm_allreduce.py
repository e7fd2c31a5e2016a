"""Two data-parallel CPU ranks on one machine average their gradients over shared memory
(fusemoe.parallel.shm_allreduce) and train exactly as with DeepSpeed's gloo all-reduce, leaving
nothing in /dev/shm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.local_cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

RANK = """
import json, os, sys
from pathlib import Path
import torch
from fusemoe.loop import train
from fusemoe.model_io import MODEL_FILE
from fusemoe.parallel import shm_allreduce

torch.set_num_threads(1)
data, out = Path(sys.argv[1]), Path(sys.argv[2])
model = dict(d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=4, top_k=2,
             expert_hidden=16, gate="laplace", router="per_modality", dropout=0.1)
cfg = {"data_dir": str(data), "model": model,
       "train": {"tasks": ["ihm"], "epochs": 2, "batch_size": 16, "lr": 0.01,
                 "weight_decay": 0.0, "seed": 0},
       "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0}}
final = {}
def keep(metrics, ckpt):  # rank 0 saves the model
    if (ckpt / "model" / MODEL_FILE).exists():
        final["state"] = torch.load(ckpt / "model" / MODEL_FILE, weights_only=True)
history = train(cfg, keep, log=lambda *a: None)["history"]
if os.environ["RANK"] == "0":
    torch.save(final["state"], out / "model.pt")
    (out / "run.json").write_text(json.dumps({
        "shm": shm_allreduce.ready(),
        "history": [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history],
    }))
"""


def run_two_ranks(data: Path, out: Path, local: bool) -> dict:
    out.mkdir()
    port = str(free_port())
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "OMP_NUM_THREADS": "1",
    }
    if local:
        env["LOCAL_WORLD_SIZE"] = "2"
    else:
        env.pop("LOCAL_WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(data), str(out)],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]
    leftovers = [f for f in os.listdir("/dev/shm") if f"_{port}_" in f]
    return json.loads((out / "run.json").read_text()) | {"leftovers": leftovers}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    from fusemoe.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("shm")
    write_synthetic(root / "data", num_stays=160, seed=2)
    shm = run_two_ranks(root / "data", root / "shm", local=True)
    gloo = run_two_ranks(root / "data", root / "gloo", local=False)
    return shm, gloo, root


def test_local_ranks_average_over_shared_memory_and_others_over_gloo(runs):
    shm, gloo, _ = runs
    assert shm["shm"] is True
    assert gloo["shm"] is False  # not known to be on one machine: DeepSpeed's all-reduce


def test_shared_memory_averaging_trains_exactly_as_the_gloo_all_reduce(runs):
    import torch

    shm, gloo, root = runs
    assert shm["history"] == gloo["history"]
    a = torch.load(root / "shm" / "model.pt", weights_only=True)
    b = torch.load(root / "gloo" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_shared_memory_segment_outlives_the_run(runs):
    shm, _, _ = runs
    assert shm["leftovers"] == []
