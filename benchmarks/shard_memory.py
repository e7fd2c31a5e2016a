"""Benchmark: peak memory of one data-parallel worker's data, for 1 and 2 workers.

    python benchmarks/shard_memory.py [--data-dir data/processed] [--out benchmarks/results/shard_memory_cpu.json]

Each rank of a Ray Train job builds its shard of the training stays (``shard=(rank, world)``; only
those stays' events are read) and the whole validation split. Here every (rank, world) is a fresh
process that imports what a worker imports (torch, the model code), builds exactly those datasets,
and reports its peak RSS (``ru_maxrss``) and its resident set after the train shard and after
validation; a process that builds nothing gives the baseline, so the train shard's own resident
share is the difference. "world 1" is also what every rank loaded before sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, resource, sys
import torch  # noqa: F401 (a worker's baseline includes torch)
from fusemoe.data.dataset import FlexiModalDataset

def mb():  # (peak RSS, current RSS) in MB
    current = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, current / 2**20

rank, world, data_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}
if world:
    train = FlexiModalDataset(data_dir, "train", shard=(rank, world))
    out["train_stays"] = len(train)
    out["train_observations"] = int(sum(s.obs_val.size for s in train.series.values()))
    out["train_peak_rss_mb"], out["train_rss_mb"] = mb()
    val = FlexiModalDataset(data_dir, "val")
out["peak_rss_mb"], out["rss_mb"] = mb()
print(json.dumps(out))
"""


def measure(rank: int, world: int, data_dir: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(rank), str(world), data_dir],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO / "data/processed"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/shard_memory_cpu.json"))
    args = parser.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch

    baseline = measure(0, 0, args.data_dir)
    workers = {}
    for world in (1, 2):
        ranks = [measure(r, world, args.data_dir) for r in range(world)]
        for r in ranks:
            for key in [k for k in r if k.endswith("_mb")]:
                r[key] = round(r[key], 1)
            r["train_data_rss_mb"] = round(r["train_rss_mb"] - baseline["rss_mb"], 1)
        workers[str(world)] = ranks
        print(f"{world} worker(s): " + ", ".join(f"peak {r['peak_rss_mb']} MB" for r in ranks))
    one = workers["1"][0]
    two = max(workers["2"], key=lambda r: r["peak_rss_mb"])
    manifest = json.loads((Path(args.data_dir) / "manifest.json").read_text())
    result = {
        "benchmark": "peak RSS of one worker's datasets (its train shard + all of val)",
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/shard_memory.py", *(argv or sys.argv[1:])]
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "torch": torch.__version__,
        },
        "data": {"source": manifest.get("source"), "counts": manifest.get("counts")},
        "baseline_rss_mb": round(baseline["rss_mb"], 1),
        "workers": workers,
        "peak_rss_ratio_2_vs_1": round(two["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "train_data_rss_ratio_2_vs_1": round(
            two["train_data_rss_mb"] / one["train_data_rss_mb"], 3
        ),
        "note": "validation is not sharded: every rank scores all of it (EP all-to-alls stay in step)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
