"""Benchmark: MEDS -> FlexiModal prepare for a synthetic MEDS dataset of ~10^6 events.

    nice python -m benchmarks.meds_prepare [--subjects 10000] [--events-per-subject 100]
        [--shards 8] [--out benchmarks/results/meds_prepare_cpu.json]

Writes a synthetic MEDS dataset (fusemoe.data.meds.write_synthetic_meds: sharded data, subject
splits, a binary label file), then runs `python -m pipelines.prepare` with `data.source: meds` in
a fresh process and records its wall time, events/s and peak RSS (getrusage of the child). To
show whether prepare holds the whole dataset in memory, the same run also measures, each in a
fresh process: the RSS of a process that only imports prepare (the floor), and the peak RSS of
one that reads every shard into one Arrow table (the events table's size in memory, also given
as Arrow nbytes); prepare again with a 12 h window (same input, a quarter of the output), and
with 4x the events per subject and the 12 h window (4x the input, about the 48 h output): a
reader that held the input would need more memory for the larger input. Results are written
after each step, so a partial run still leaves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from pipelines.common import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _child(setup: list[str], code: list[str]) -> tuple[float, float, str]:
    """(wall s of `code`, peak RSS MiB, stdout) of a fresh Python process running `setup`
    (e.g. imports, not timed) then `code`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    program = "; ".join(
        ["import resource, sys, time", *setup, "t = time.perf_counter()", *code]
        + [
            "print('WALL', time.perf_counter() - t)",
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, cwd=REPO, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr.strip().splitlines()[-1:]}")
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines() if " " in ln)
    return float(lines["WALL"]), int(lines["RSS"]) / 1024, out.stdout


def _generate(work: Path, name: str, subjects: int, events_per_subject: int, shards: int) -> dict:
    """write_synthetic_meds in a child process. Linux keeps a process's peak RSS across exec, so a
    parent that had generated millions of events itself would lend every later child its peak."""
    call = (
        f"made = write_synthetic_meds({str(work / name)!r}, {str(work / f'{name}_labels.parquet')!r}, "
        f"num_subjects={subjects}, events_per_subject={events_per_subject}, num_shards={shards})"
    )
    _, _, stdout = _child(
        ["import json", "from fusemoe.data.meds import write_synthetic_meds"],
        [call, "print('MADE', json.dumps(made))"],
    )
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("MADE"))[5:])


def _prepare(work: Path, window_h: float, name: str = "meds") -> tuple[float, float, str, dict]:
    """`python -m pipelines.prepare` (source meds) in a fresh process: wall, peak RSS, output,
    the written manifest."""
    params = work / "params.yaml"
    data = {
        "source": "meds",
        "out_dir": str(work / "processed"),
        "meds": {
            "dataset_dir": str(work / name),
            "labels": str(work / f"{name}_labels.parquet"),
            "window_h": window_h,
        },
    }
    params.write_text(yaml.safe_dump({"data": data}))
    wall, rss, stdout = _child(
        ["import pipelines.prepare as p"], [f"rc = p.main(['--params', {str(params)!r}])"]
    )
    return wall, rss, stdout, json.loads((work / "processed" / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--events-per-subject", type=int, default=100)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/meds_prepare_cpu.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result: dict = {
        "benchmark": "meds_prepare",
        "command": "nice python -m benchmarks.meds_prepare " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "pandas": pd.__version__,
            "numpy": np.__version__,
        },
    }
    work = Path(tempfile.mkdtemp(prefix="fusemoe-meds-bench-"))
    try:
        t = time.perf_counter()
        made = _generate(work, "meds", args.subjects, args.events_per_subject, args.shards)
        shards = sorted((work / "meds" / "data").glob("*.parquet"))
        result["dataset"] = made | {
            "shards": len(shards),
            "parquet_bytes": sum(p.stat().st_size for p in shards),
            "generate_s": round(time.perf_counter() - t, 2),
        }
        write_json_atomic(out, result)

        _, floor, _ = _child(["import pipelines.prepare, fusemoe.data.meds"], [])
        read_code = [  # the same imports as prepare, so the floors match
            "import pyarrow.dataset as ds",
            f"tab = ds.dataset({str(work / 'meds' / 'data')!r}).to_table()",
            "print('NBYTES', tab.nbytes)",
        ]
        read_s, read_rss, stdout = _child(["import pipelines.prepare"], read_code)
        nbytes = int(next(ln for ln in stdout.splitlines() if ln.startswith("NBYTES")).split()[1])
        result["events_table_in_memory"] = {
            "arrow_nbytes_mib": round(nbytes / 2**20, 1),
            "read_all_peak_rss_mib": round(read_rss, 1),
            "read_all_s": round(read_s, 2),
        }
        result["import_only_rss_mib"] = round(floor, 1)
        write_json_atomic(out, result)

        events = made["events"]
        # A 12 h window keeps a quarter of the events of the same input: if memory followed the
        # input it would not change; it falls with the output.
        for key, window in (("prepare_window_12h", 12.0), ("prepare", 48.0)):
            wall, rss, stdout, manifest = _prepare(work, window)
            result[key] = {
                "window_h": window,
                "wall_s": round(wall, 2),
                "events_per_s": round(events / wall),
                "peak_rss_mib": round(rss, 1),
                "peak_rss_above_import_mib": round(rss - floor, 1),
                "stays": manifest["counts"]["stays"],
                "output_events": manifest["counts"]["events"],
                "meds_counts": manifest["meds"]["counts"],
                "summary": stdout.splitlines()[0],
            }
            write_json_atomic(out, result)
        short = result["prepare_window_12h"]
        # 4x the events per subject with the 12 h window: 4x the input, about the output of the
        # 48 h run. Streaming needs about the 48 h run's memory; holding the input would need 4x.
        big = _generate(work, "meds4", args.subjects, 4 * args.events_per_subject, args.shards)
        shutil.rmtree(work / "meds", ignore_errors=True)
        wall4, rss4, _, manifest4 = _prepare(work, 12.0, "meds4")
        result["prepare_4x_events_window_12h"] = {
            "events": big["events"],
            "wall_s": round(wall4, 2),
            "events_per_s": round(big["events"] / wall4),
            "peak_rss_mib": round(rss4, 1),
            "peak_rss_above_import_mib": round(rss4 - floor, 1),
            "output_events": manifest4["counts"]["events"],
        }
        write_json_atomic(out, result)
        result["reading"] = (
            f"prepare of {events:,} MEDS events: {wall:.1f} s ({events / wall:,.0f} events/s), "
            f"peak RSS {rss:.0f} MiB ({rss - floor:.0f} MiB above the {floor:.0f} MiB of the "
            f"imports) vs {nbytes / 2**20:.0f} MiB for the events table in Arrow and "
            f"{read_rss:.0f} MiB peak RSS to read it whole; with a 12 h window "
            f"({short['output_events']:,} output events) {short['peak_rss_above_import_mib']:.0f} "
            f"MiB above the imports; 4x the input ({big['events']:,} events, 12 h window, "
            f"{manifest4['counts']['events']:,} output events): {wall4:.1f} s, "
            f"{rss4 - floor:.0f} MiB above the imports"
        )
        write_json_atomic(out, result)
        print(result["reading"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
