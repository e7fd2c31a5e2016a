"""Benchmark: how prepare and one training epoch grow with the data, at 1x, 4x and 10x P12.

    python benchmarks/data_scaling.py [--scales 1 4 10] [--train-stays-per-x 0]
        [--raw-dir ../shared/data/physionet2012] [--work /tmp/data_scaling]
        [--prepare-only] [--before-code /path/to/another/checkout]
        [--out benchmarks/results/data_scaling_cpu.json]

Input at scale k: k replicas of the 12,000 real P12 records (sets a, b, c of 4,000k records each)
with new RecordIDs (replica r adds r * 1,000,000; the `00:00,RecordID,` line and Outcomes rows
follow), written as extracted `set-X/` folders and `Outcomes-X.txt`, so the real `prepare` code path
(pipelines.prepare -> read_physionet2012 -> write_flexi, verify_digests off since the copies are
not the published sets) parses, cleans, validates and writes them. Values are copied unjittered:
no stage's cost depends on the values, and exact copies make the replicas' cost identical to the
real stays'.

Every measurement is a fresh subprocess whose own peak RSS comes from `os.wait4` (ru_maxrss of that
child alone):
- prepare: wall time and peak RSS of `python -m pipelines.prepare`, beside `prepare_imports`
  (a process that imports what prepare imports and reads nothing), so the data's own share is
  visible; `--before-code DIR` also runs DIR's prepare (e.g. a checkout of an older commit) on
  the same replicas (`prepare_before`) and says whether its files are the same;
- worker data: what one data-parallel rank loads (its train shard `shard=(rank, world)` and all of
  validation, as fusemoe.loop.train builds them), for world 1 and for rank 0 of a 2-way shard, and
  a process that imports the same but loads nothing (baseline), so the data's own share is visible;
- cpu_s (user + system seconds of the child) beside every wall time: the machine is shared, and
  CPU seconds measure the work where wall seconds also measure the neighbours;
- epoch: one epoch of the shipped loop `fusemoe.loop.train` (params.yaml model/train/deepspeed with
  best_params.yaml laid over, train.epochs 1, one worker) including its validation pass.
  `--train-stays-per-x N` caps the epoch's training stays at N k (train.max_train_stays), so the
  trained work still grows with k; the JSON gives seconds per training stay and per validation
  stay, and the full epoch they imply (validation is always the whole split).

`--prepare-only` measures prepare alone and keeps the worker and epoch figures already in `--out`
for that scale. Results are written after every measurement (a partial run still leaves JSON) and merged with the
scales already in `--out`, so scales can be run one at a time. Ratios are against 1x: "per_x" is
ratio / k, so <= 1 means growth at most linear (a 10% margin is allowed for the shared machine's
noise). The machine's load average is recorded with each measurement.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.common import write_json_atomic  # noqa: E402

ID_STRIDE = 1_000_000  # P12 RecordIDs are 6 digits: replica r of record i is i + r * ID_STRIDE
LINEAR_MARGIN = 1.10
NOTES = [
    "Wall seconds on the shared 2-core machine are dominated by the neighbours (load average "
    "in each entry, 10-27): read growth off cpu_s.",
    "worker_data is one rank's uncapped data (its train shard + all of validation), the part of "
    "a worker's memory that grows with the data; the epoch's own peak RSS is with the capped "
    "training set (max_train_stays) and the whole validation split.",
    "Each rank decodes every row group of events.parquet and keeps only its stays' rows (a "
    "pyarrow filter while scanning: the shard's stays are spread over all row groups), so its "
    "memory follows its share and its decode CPU the whole file.",
    "prepare parses P12 in chunks of ~16 MiB of records (PARSE_CHUNK_BYTES, read from an "
    "extracted set folder when the chunk is parsed), spills each chunk's events (13 B per event) "
    "beside the output until the stays and their split are known, and then streams them through "
    "write_flexi, which validates, sums the train-only statistics exactly and writes "
    "events.parquet 256k rows at a time (EVENT_BATCH_ROWS): no process holds the events table.",
]

DATA_CHILD = """
import json, os, resource, sys, time
import torch  # noqa: F401 (a worker's baseline includes torch and the model code)
import fusemoe.loop  # noqa: F401
from fusemoe.data.dataset import FlexiModalDataset

data_dir, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
t0 = time.perf_counter()
if world:
    train = FlexiModalDataset(data_dir, "train", shard=(rank, world))
    val = FlexiModalDataset(data_dir, "val")
    out.update(train_stays=len(train), val_stays=len(val))
    out["train_observations"] = int(sum(s.obs_val.size for s in train.series.values()))
out["build_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""

EPOCH_CHILD = """
import json, sys, time
from pipelines.common import apply_best_params, load_params
from fusemoe.loop import train

repo, data_dir, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = apply_best_params(
    load_params(f"{repo}/params.yaml", ("model", "train", "deepspeed")), f"{repo}/best_params.yaml"
)
cfg = {
    "data_dir": data_dir,
    "model": params["model"],
    "train": {**params["train"], "epochs": 1, "max_train_stays": cap},
    "deepspeed": params["deepspeed"],
}
cpu = {}
t0, cpu["start"] = time.perf_counter(), time.process_time()
m = train(cfg, report=lambda metrics, ckpt: cpu.setdefault("end", time.process_time()),
          log=lambda *a, **k: None)["metrics"]
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "train_call_cpu_s": cpu["end"] - cpu["start"], "epoch_s": m["epoch_s"], "samples_per_s": m["samples_per_s"],
                  "train_loss": m["train_loss"], "primary": params["train"]["primary_metric"],
                  "primary_value": m.get(params["train"]["primary_metric"])}))
"""


def run_child(args: list[str], cwd: Path) -> dict:
    """Runs `args` under nice; returns wall seconds, the child's own peak RSS and its JSON line.
    The child imports the code of `cwd` (this checkout, or --before-code)."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=so, stderr=se, text=True)
        # wait4 gives this child's rusage alone (RUSAGE_CHILDREN is the max over all children).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed ({code}):\n{stderr[-3000:]}")
    out = {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if last.startswith("{"):
        out["child"] = json.loads(last)
    else:
        out["stdout_tail"] = stdout.strip().splitlines()[-1:] if stdout.strip() else []
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


def build_replica(raw_dir: Path, dest: Path, k: int) -> dict:
    """k copies of every P12 record and outcome with new RecordIDs, as extracted set folders."""
    from fusemoe.data.physionet2012 import SETS, _set_files

    if (dest / "complete.json").is_file():
        return json.loads((dest / "complete.json").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    records, nbytes = 0, 0
    for s in SETS:
        folder = dest / f"set-{s}"
        folder.mkdir()
        _, files = _set_files(raw_dir, s)
        for name, data in files:
            rid = int(name.removesuffix(".txt"))
            line = f"00:00,RecordID,{rid}\n".encode()
            assert data.count(line) == 1, f"{name}: RecordID line not found"
            for r in range(k):
                new = rid + r * ID_STRIDE
                body = data.replace(line, f"00:00,RecordID,{new}\n".encode())
                (folder / f"{new}.txt").write_bytes(body)
                records += 1
                nbytes += len(body)
        del files
        lines = (raw_dir / f"Outcomes-{s}.txt").read_text().splitlines()
        rows = []
        for r in range(k):
            for row in lines[1:]:
                if row.strip():
                    rid, rest = row.split(",", 1)
                    rows.append(f"{int(rid) + r * ID_STRIDE},{rest}")
        (dest / f"Outcomes-{s}.txt").write_text("\n".join([lines[0], *rows]) + "\n")
    info = {
        "records": records,
        "record_bytes": nbytes,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    (dest / "complete.json").write_text(json.dumps(info))
    return info


IMPORTS_CHILD = "import pipelines.prepare, fusemoe.data.physionet2012, pyarrow.csv"


def run_prepare(raw: Path, out: Path, params: Path, code: Path) -> dict:
    """`python -m pipelines.prepare` of the checkout `code` on the replica `raw`."""
    params.write_text(
        "data:\n  source: physionet2012\n"
        f"  download_dir: {raw}\n  out_dir: {out}\n  verify_digests: false\n"
        "  split: [0.7, 0.15, 0.15]\n  seed: 0\n  los_threshold_days: 7\n"
    )
    prep = run_child([sys.executable, "-m", "pipelines.prepare", "--params", str(params)], code)
    prep["summary"] = prep.pop("stdout_tail", [])
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    prep["stays"], prep["events"], prep["splits"] = (
        counts["stays"],
        counts["events"],
        counts["splits"],
    )
    prep["events_parquet_mib"] = round((out / "events.parquet").stat().st_size / 2**20, 1)
    commit = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    prep["code"] = {"dir": str(code), "commit": commit.stdout.strip()}
    return prep


def same_output(a: Path, b: Path) -> dict:
    """Are two prepared directories the same: Parquet files byte for byte, manifests equal but
    for `norm`, whose mean/std may differ in the last digits but not as float32 (the model
    normalises with float32 statistics)."""
    import numpy as np

    out = {
        f: (a / f).read_bytes() == (b / f).read_bytes() for f in ("events.parquet", "stays.parquet")
    }
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    na, nb = ma.pop("norm"), mb.pop("norm")
    out["manifest_without_norm"] = ma == mb
    pairs = [(na[m][v], nb[m][v]) for m in na for v in na[m]]
    out["norm_float32"] = all(
        x["count"] == y["count"]
        and all(np.float32(x[k]) == np.float32(y[k]) for k in ("mean", "std"))
        for x, y in pairs
    )
    out["norm_exact"] = all(x == y for x, y in pairs)
    return out


def measure_scale(k: int, args: argparse.Namespace, work: Path, save, previous: dict) -> dict:
    raw = work / f"raw-{k}x"
    flexi = work / f"flexi-{k}x"
    entry: dict = {"scale": k, **(previous if args.prepare_only else {})}
    entry["raw"] = build_replica(Path(args.raw_dir).resolve(), raw, k)
    save(k, entry)

    py = [sys.executable]
    entry["prepare_imports"] = run_child([*py, "-c", IMPORTS_CHILD], REPO)
    prep = run_prepare(raw, flexi, work / f"params-{k}x.yaml", REPO)
    prep["data_share_mib"] = round(
        prep["peak_rss_mib"] - entry["prepare_imports"]["peak_rss_mib"], 1
    )
    entry["prepare"] = prep
    save(k, entry)
    print(f"{k}x prepare: {prep['wall_s']} s, peak {prep['peak_rss_mib']} MiB", flush=True)
    if args.before_code:
        before = work / f"flexi-before-{k}x"
        b = run_prepare(raw, before, work / f"params-before-{k}x.yaml", Path(args.before_code))
        b["same_output"] = same_output(flexi, before)
        entry["prepare_before"] = b
        shutil.rmtree(before, ignore_errors=True)
        save(k, entry)
        print(f"{k}x prepare before: {b['wall_s']} s, peak {b['peak_rss_mib']} MiB", flush=True)
    if args.prepare_only:
        return entry
    counts = json.loads((flexi / "manifest.json").read_text())["counts"]

    entry["worker_data"] = {}
    for name, rank, world in (("baseline", 0, 0), ("world1", 0, 1), ("rank0_of_2", 0, 2)):
        m = run_child([*py, "-c", DATA_CHILD, str(flexi), str(rank), str(world)], REPO)
        entry["worker_data"][name] = m
        save(k, entry)
        print(f"{k}x worker data {name}: peak {m['peak_rss_mib']} MiB", flush=True)
    base = entry["worker_data"]["baseline"]["peak_rss_mib"]
    for name in ("world1", "rank0_of_2"):
        d = entry["worker_data"][name]
        d["data_share_mib"] = round(d["peak_rss_mib"] - base, 1)
    save(k, entry)

    cap = args.train_stays_per_x * k
    ep = run_child([*py, "-c", EPOCH_CHILD, str(REPO), str(flexi), str(cap)], REPO)
    c = ep.pop("child")
    train_stays = counts["splits"]["train"] if cap <= 0 else min(cap, counts["splits"]["train"])
    val_stays = counts["splits"]["val"]
    train_s = train_stays / c["samples_per_s"]
    val_s = c["epoch_s"] - train_s
    ep.update(
        max_train_stays=cap,
        train_stays=train_stays,
        val_stays=val_stays,
        epoch_s=round(c["epoch_s"], 2),
        train_call_cpu_s=round(c["train_call_cpu_s"], 2),
        train_s=round(train_s, 2),
        val_s=round(val_s, 2),
        ms_per_train_stay=round(1000 * train_s / train_stays, 3),
        ms_per_val_stay=round(1000 * val_s / val_stays, 3),
        full_epoch_s=round(
            train_s / train_stays * counts["splits"]["train"] + val_s, 2
        ),  # equals epoch_s when uncapped
        train_loss=round(c["train_loss"], 5),
        **{c["primary"]: c["primary_value"]},
    )
    entry["epoch"] = ep
    save(k, entry)
    print(
        f"{k}x epoch: {ep['epoch_s']} s ({train_stays} train stays), peak {ep['peak_rss_mib']} MiB"
    )
    return entry


def ratios(scales: dict) -> dict:
    """Per scale: value / value at 1x, and that ratio / k (<= 1: at most linear)."""
    if "1x" not in scales:
        return {}
    one = scales["1x"]
    figures = {
        "prepare_wall_s": ("prepare", "wall_s"),
        "prepare_cpu_s": ("prepare", "cpu_s"),
        "prepare_peak_rss_mib": ("prepare", "peak_rss_mib"),
        "prepare_data_share_mib": ("prepare", "data_share_mib"),
        "prepare_before_cpu_s": ("prepare_before", "cpu_s"),
        "prepare_before_peak_rss_mib": ("prepare_before", "peak_rss_mib"),
        "worker_world1_peak_rss_mib": ("worker_data", "world1", "peak_rss_mib"),
        "worker_world1_data_share_mib": ("worker_data", "world1", "data_share_mib"),
        "worker_rank0_of_2_peak_rss_mib": ("worker_data", "rank0_of_2", "peak_rss_mib"),
        "worker_rank0_of_2_data_share_mib": ("worker_data", "rank0_of_2", "data_share_mib"),
        "epoch_peak_rss_mib": ("epoch", "peak_rss_mib"),
        "epoch_train_call_cpu_s": ("epoch", "train_call_cpu_s"),
        "full_epoch_s": ("epoch", "full_epoch_s"),
    }

    def get(entry: dict, path: tuple) -> float | None:
        for key in path:
            if not isinstance(entry, dict) or key not in entry:
                return None
            entry = entry[key]
        return entry

    out = {}
    for name, entry in scales.items():
        k = entry["scale"]
        if k == 1:
            continue
        r = {}
        for fig, path in figures.items():
            a, b = get(one, path), get(entry, path)
            if a and b is not None:
                ratio = b / a
                r[fig] = {
                    "ratio": round(ratio, 3),
                    "per_x": round(ratio / k, 3),
                    "at_most_linear": ratio / k <= LINEAR_MARGIN,
                }
        out[name] = r
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument(
        "--train-stays-per-x",
        type=int,
        default=0,
        help="cap the epoch's training stays at this many per 1x (k x N at scale k; 0 = all)",
    )
    parser.add_argument("--raw-dir", default=str(REPO / "../shared/data/physionet2012"))
    parser.add_argument("--work", default="/tmp/data_scaling")
    parser.add_argument("--keep", action="store_true", help="keep each scale's raw and flexi dirs")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="measure prepare only (keeps the worker/epoch figures already in --out)",
    )
    parser.add_argument(
        "--before-code",
        default="",
        help="also run the prepare of this checkout on the same replicas (prepare_before)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/data_scaling_cpu.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}

    import numpy as np
    import pyarrow as pa
    import torch

    result.update(
        benchmark="prepare and one training epoch (fusemoe.loop.train) at k x P12",
        machine={
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        versions={"numpy": np.__version__, "pyarrow": pa.__version__, "torch": torch.__version__},
        input="k replicas of the real P12 records with new RecordIDs (docstring of this file)",
        linear_margin=LINEAR_MARGIN,
        notes=NOTES,
    )
    result.setdefault("scales", {})
    result.setdefault("commands", [])
    result["commands"].append(
        " ".join(["python", "benchmarks/data_scaling.py", *(argv or sys.argv[1:])])
    )

    def save(k: int, entry: dict) -> None:
        result["scales"][f"{k}x"] = entry
        result["scales"] = dict(sorted(result["scales"].items(), key=lambda kv: kv[1]["scale"]))
        result["ratios_vs_1x"] = ratios(result["scales"])
        write_json_atomic(out, result)

    for k in args.scales:
        measure_scale(k, args, work, save, result["scales"].get(f"{k}x", {}))
        if not args.keep:
            shutil.rmtree(work / f"raw-{k}x", ignore_errors=True)
            shutil.rmtree(work / f"flexi-{k}x", ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
