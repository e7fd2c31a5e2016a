"""One bf16 epoch of real FuseMoE training through Ray Train + DeepSpeed on one CUDA GPU (NCCL).

    python benchmarks/gpu_epoch.py [--data-dir data/processed] [--out benchmarks/results/gpu_epoch_cuda.json]

Trains params.yaml's model for one epoch with ``deepspeed.precision: bf16``, ``ray.use_gpu: true``
and one worker, through the same ``ray_jobs.train.run_training`` the pipeline uses, and records
what the worker actually ran on (device, process-group backend) next to the
epoch's metrics. Data: ``--data-dir`` when it holds a prepared dataset (P12 from
``pipelines.prepare``), else the synthetic generator (the JSON says which). ``--cpu`` runs the same
path on CPU with gloo, only to smoke-test the script where no GPU exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recording_train(cfg: dict, report, restore_dir: Path | None = None) -> dict:
    """fusemoe.loop.train whose reports also say where and how the worker trained."""
    import torch
    import torch.distributed as dist

    from fusemoe import loop as training_loop

    def reporting(metrics: dict, checkpoint_dir: Path) -> None:
        report(
            {
                **metrics,
                "backend": dist.get_backend(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            },
            checkpoint_dir,
        )

    return training_loop.train(cfg, reporting, restore_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO / "data/processed"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_epoch_cuda.json"))
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPU (gloo)")
    args = parser.parse_args(argv)

    import deepspeed
    import ray
    import torch

    from fusemoe.data.synthetic import write_synthetic
    from ray_jobs.train import run_training

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_epoch: no CUDA device (torch.cuda.is_available() is False)")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="fusemoe-gpu-epoch-"))
    data_dir, source = Path(args.data_dir).resolve(), "prepared"
    if not (data_dir / "manifest.json").is_file():
        data_dir, source = tmp / "synthetic", "synthetic"
        write_synthetic(data_dir, num_stays=2000, seed=0)
    params["train"].update(epochs=1, max_train_stays=0)
    params["deepspeed"].update(precision="bf16", ep_size=1)
    params["ray"].update(
        num_workers=1,
        use_gpu=not args.cpu,
        cpus_per_worker=1,
        num_cpus=min(4, os.cpu_count() or 1),
        storage_path=str(tmp / "ray"),
        max_failures=0,
    )
    t0 = time.perf_counter()
    try:
        _, metrics, history = run_training(params, data_dir, "gpu-epoch", train_fn=recording_train)
    finally:
        ray.shutdown()
        wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
    epoch = history[-1] if history else metrics
    result = {
        "benchmark": "one bf16 epoch, Ray Train + DeepSpeed, 1 worker",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda,
        },
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "ray": ray.__version__,
        },
        "data": {"source": source, "dir": str(data_dir)},
        "model": params["model"],
        "backend": metrics.get("backend"),
        "device": metrics.get("device"),
        "precision": "bf16",
        "wall_s_including_startup": round(wall, 1),
        "epoch": {k: v for k, v in epoch.items() if isinstance(v, int | float)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}: {result['backend']} on {result['device']}, {epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
