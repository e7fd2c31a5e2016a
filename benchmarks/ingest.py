"""Benchmark: full PhysioNet 2012 ingest (12,000 stays, raw tarballs -> FlexiModal directory).

    python -m benchmarks.ingest [--raw-dir DIR] [--repeats N] [--out benchmarks/results/ingest_cpu.json]

Times what `python -m pipelines.prepare` does for source=physionet2012 (read + verify digests +
clean + split + validate + train-only statistics + atomic Parquet write) into a temporary
directory, and records machine, versions and the manifest figures the issue asks for.
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

import numpy as np
import pandas as pd
import pyarrow as pa

from fusemoe.data.flexi import write_flexi
from fusemoe.data.physionet2012 import read_physionet2012

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = os.environ.get("FUSEMOE_DATA_DIR") or str(REPO.parent / "shared/data/physionet2012")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_once(raw_dir: str) -> tuple[dict, dict]:
    out = Path(tempfile.mkdtemp(prefix="fusemoe-ingest-"))
    try:
        t0 = time.perf_counter()
        stays, events, manifest = read_physionet2012(raw_dir)
        t1 = time.perf_counter()
        manifest = write_flexi(out / "flexi", stays, events, manifest)
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in (out / "flexi").iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"read_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0, "bytes": size}, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", default=DEFAULT_RAW)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/ingest_cpu.json"))
    args = parser.parse_args(argv)

    load_before = os.getloadavg()  # the 2-core CI machine is shared: record how busy it was
    runs = []
    for _ in range(args.repeats):
        timing, manifest = run_once(args.raw_dir)
        runs.append(timing)
        print(
            f"ingest: {timing['total_s']:.1f} s (read {timing['read_s']:.1f}, write {timing['write_s']:.1f})"
        )
    best = min(runs, key=lambda r: r["total_s"])
    stays = manifest["counts"]["stays"]
    result = {
        "benchmark": "physionet2012 ingest (raw tarballs -> FlexiModal Parquet)",
        "command": " ".join(
            [Path(sys.executable).name, "-m", "benchmarks.ingest", *(argv or sys.argv[1:])]
        ),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        },
        "versions": {"numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__},
        "raw_dir": args.raw_dir,
        "runs": runs,
        "seconds": round(best["total_s"], 2),
        "stays_per_s": round(stays / best["total_s"], 1),
        "target_s": 60,
        "manifest": {
            "stays": stays,
            "events": manifest["counts"]["events"],
            "splits": manifest["counts"]["splits"],
            "label_rates": manifest["label_rates"],
            "modality_missingness": {
                m: v["all"] for m, v in manifest["missingness"]["modality"].items()
            },
            "cleaning": {
                k: v for k, v in manifest["cleaning"].items() if k != "stays_without_series_ids"
            },
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: {result['seconds']} s, {result['stays_per_s']} stays/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
