"""Scaling benchmark on the local three-node cluster (Ray head with no CPUs + two 1-CPU worker
nodes, moto S3 for checkpoints and data), with ratios taken within one run:

    python benchmarks/scaling.py [--stays 2000] [--epochs 3] [--out benchmarks/results/scaling_cpu.json]

- data parallel: training samples/s with 1 worker vs 2 workers on separate nodes (EP=1);
- expert parallel: 2 workers with EP=1 (every rank holds all experts) vs EP=2 (half each);
- node failure: wall time of a 2-worker run whose worker node is killed once mid-epoch (Ray
  restarts the group on a fresh node from the last checkpoint on S3) minus the uninterrupted run;
- Tune: trials per hour of a search of 2-worker TorchTrainer trials, 1 vs 2 concurrent trials
  (half a CPU per worker, the trials on the head's TRAIN_DRIVER resource).

samples/s is the last epoch's (the first one pays for JIT and warm-up). The machine is shared, so
its load average is recorded; only the ratios within this file are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def base_params(storage: str, stays_dir: Path, epochs: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(out_dir=str(stays_dir), source="synthetic")
    params["model"].update(num_experts=8, top_k=2)
    params["train"].update(
        epochs=epochs,
        tasks=["ihm"],
        max_train_stays=0,
        use_best_params=False,
        lr_schedule="constant",
    )
    params["deepspeed"].update(zero_stage=1, ep_size=1)
    params["ray"].update(
        address="", num_workers=2, cpus_per_worker=1, max_failures=1, storage_path=storage
    )
    params["mlflow"]["system_metrics"] = False
    return params


def timed_run(params: dict, data_uri: str, name: str, during=None) -> dict:
    """One run_training; `during(start_time)` runs in a thread alongside (the node killer)."""
    from ray_jobs.train import run_training

    t0 = time.perf_counter()
    helper = threading.Thread(target=during, args=(t0,), daemon=True) if during else None
    if helper:
        helper.start()
    _, metrics, history = run_training(params, data_uri, name)
    wall = time.perf_counter() - t0
    if helper:
        helper.join()
    last = history[-1] if history else metrics
    print(f"{name}: {wall:.1f} s, {last['samples_per_s']:.1f} samples/s", flush=True)
    return {
        "wall_s": round(wall, 1),
        "samples_per_s_last_epoch": round(float(last["samples_per_s"]), 2),
        "epoch_s": [round(float(h["epoch_s"]), 2) for h in history],
        "val_auroc_ihm": [round(float(h["val_auroc_ihm"]), 6) for h in history],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=2000, help="synthetic stays")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tune-samples", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/scaling_cpu.json"))
    args = parser.parse_args(argv)

    from ray_jobs.local_cluster import LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="fusemoe-scaling-"))
    load_before = os.getloadavg()
    cluster = LocalCluster(tmp / "cluster", num_workers=2, cpus_per_worker=1, start_timeout_s=900)
    with cluster:
        os.environ.update(cluster.env())  # before Ray is imported: it reads them then
        result = measure(cluster, tmp, args)
        import ray

        ray.shutdown()  # before the cluster goes down, or the driver exits with a GCS error
    result["machine"]["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    result["machine"]["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    result["command"] = " ".join(
        [Path(sys.executable).name, "benchmarks/scaling.py", *(argv or sys.argv[1:])]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    out.with_suffix(".tmp").replace(out)
    print(f"wrote {out}")
    return 0


def measure(cluster, tmp: Path, args) -> dict:
    import deepspeed
    import ray
    import torch

    from fusemoe.data.synthetic import write_synthetic
    from pipelines.common import data_hash
    from pipelines.tune import run_stage
    from ray_jobs import storage

    stays_dir = tmp / "data"
    write_synthetic(stays_dir, num_stays=args.stays, seed=0)
    storage_uri = cluster.storage_uri("bench")
    data_uri = storage.dataset_uri(stays_dir, storage_uri, data_hash(stays_dir))
    params = base_params(storage_uri, stays_dir, args.epochs)

    def variant(**ray_or_ds) -> dict:
        p = json.loads(json.dumps(params))
        p["ray"].update({k: v for k, v in ray_or_ds.items() if k in p["ray"]})
        p["deepspeed"].update({k: v for k, v in ray_or_ds.items() if k in p["deepspeed"]})
        return p

    runs = {
        "dp_1_worker": timed_run(variant(num_workers=1), data_uri, "dp1"),
        "dp_2_workers": timed_run(variant(num_workers=2), data_uri, "dp2"),
        "ep_2_workers": timed_run(variant(num_workers=2, ep_size=2), data_uri, "ep2"),
    }

    def kill_mid_epoch(t0: float) -> None:
        """Once epoch 1's checkpoint is on S3, wait half an epoch, then kill a worker node."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(storage.join(storage_uri, "dp2-kill"))
        while not any(
            i.base_name.startswith("checkpoint_")
            for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        ):
            time.sleep(0.5)
        time.sleep(runs["dp_2_workers"]["epoch_s"][-1] / 2)
        alive = next(i for i, w in enumerate(cluster.state["ray"]["workers"]) if w["alive"])
        cluster.kill_worker_node(alive)
        cluster.add_worker_node(timeout_s=600)

    runs["dp_2_workers_node_killed"] = timed_run(
        variant(num_workers=2), data_uri, "dp2-kill", during=kill_mid_epoch
    )

    tune = {}
    for concurrent in (1, 2):
        p = variant(cpus_per_worker=0.5)
        p["mlflow"].update(tracking_uri=cluster.tracking_uri, experiment="fusemoe")
        p["ray"]["storage_path"] = cluster.storage_uri(f"bench-tune-{concurrent}")
        p["tune"].update(
            name=f"bench-{concurrent}",
            num_samples=args.tune_samples,
            max_epochs=2,
            grace_period=2,
            trial_workers=2,
            max_concurrent_trials=concurrent,
        )
        t0 = time.perf_counter()
        run_stage(p, tmp / f"best-{concurrent}.yaml", tmp / f"tune-{concurrent}.json")
        wall = time.perf_counter() - t0
        tune[f"{concurrent}_concurrent"] = {
            "wall_s": round(wall, 1),
            "trials": args.tune_samples,
            "trials_per_hour": round(args.tune_samples / wall * 3600, 1),
        }
        print(f"tune, {concurrent} concurrent: {wall:.1f} s", flush=True)

    dp1, dp2, ep2 = runs["dp_1_worker"], runs["dp_2_workers"], runs["ep_2_workers"]
    killed = runs["dp_2_workers_node_killed"]
    return {
        "benchmark": "scaling on the local 3-node cluster (CPU, gloo)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "ray": ray.__version__,
        },
        "setup": {
            "nodes": "Ray head (0 CPUs, TRAIN_DRIVER) + 2 worker nodes of 1 CPU, all on 127.0.0.1",
            "storage": "moto S3 (checkpoints, dataset)",
            "data": f"synthetic, {args.stays} stays",
            "model": params["model"],
            "epochs": args.epochs,
            "batch_size": params["train"]["batch_size"],
            "zero_stage": params["deepspeed"]["zero_stage"],
        },
        "runs": runs,
        "tune": tune,
        "ratios": {
            "samples_per_s_2_workers_vs_1": round(
                dp2["samples_per_s_last_epoch"] / dp1["samples_per_s_last_epoch"], 3
            ),
            "samples_per_s_ep2_vs_ep1": round(
                ep2["samples_per_s_last_epoch"] / dp2["samples_per_s_last_epoch"], 3
            ),
            "node_failure_cost_s": round(killed["wall_s"] - dp2["wall_s"], 1),
            "node_failure_same_val_auroc": killed["val_auroc_ihm"] == dp2["val_auroc_ihm"],
            "tune_trials_per_hour_2_vs_1_concurrent": round(
                tune["2_concurrent"]["trials_per_hour"] / tune["1_concurrent"]["trials_per_hour"], 3
            ),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
