"""Where a P12 training epoch spends its time, for today's code and for this tree, in one run.

Each measurement trains the default configuration (params.yaml + best_params.yaml) for
``--epochs`` epochs through ``fusemoe.loop.train``, the loop the train stage's Ray workers run
(DeepSpeed engine on CPU, a one-rank gloo group), in a fresh subprocess whose PYTHONPATH is one
code tree: ``baseline`` (``git archive`` of ``--baseline-ref``, main by default) or ``current``
(this tree). Repetitions alternate baseline/current (ABBA order) on the same machine, data and
thread count, and the summary reports medians, so a busy shared machine biases neither side.

Phases are timed from outside the loop, so both trees are measured the same way without any
instrumentation in the product code: wrappers around the DataLoader iterator (data loading and
collate), ``DeepSpeedEngine.forward/backward/step``, forward hooks on the mTAND encoders, the
static encoder, each block's self-attention and MoE layer, ``fusemoe.loop.predict``
(validation) and the epoch boundaries (``ShardBatches.set_epoch`` .. the ``report`` call, so an
epoch is what a user waits for: training, validation and the checkpoint). The first epoch of a
process includes one-off warm-up (allocator, thread pool); the summary uses every epoch after
the first (``--epochs 2`` gives one).

Times are process CPU seconds (``time.process_time``; one torch thread by default, as a Ray
worker with ``cpus_per_worker: 1`` runs), which a shared, oversubscribed machine inflates far
less than wall time; each epoch's wall time is recorded beside it. On an idle machine the two
agree.

    python benchmarks/epoch_profile.py --reps 3 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "/work/main/data/processed"
OUT = ROOT / "benchmarks/results/epoch_profile_cpu.json"
PHASES = (
    "data",  # DataLoader: __getitem__ + collate (+ workers' hand-off)
    "fwd_mtand",
    "fwd_static",
    "fwd_attention",
    "fwd_moe",
    "fwd_other",  # embeddings, heads, losses outside the engine call are in train_other
    "backward",
    "optimizer_step",
    "train_other",  # loss, host syncs, modality dropout, loop bookkeeping
    "validation",  # predict() over the validation split (data + forward + metrics glue)
    "val_data",
    "val_forward",
    "metrics_checkpoint",  # task metrics, checkpoint save, report
)


# The current tree with train.bucket_by_length off: what everything but the bucketing buys.
UNBUCKETED = ("current_unbucketed",)
EPOCH_KEYS = (
    "epoch_cpu_s",
    "epoch_cpu_s_all_ranks",
    "epoch_s",
    "train_cpu_s",
    "train_s",
    "forward_cpu_s",
)


# -- the measured subprocess -----------------------------------------------------------------
class _Clock:
    """Accumulates seconds per phase for the current epoch; nested timers subtract nothing, so
    forward sub-phases are reported inside ``forward`` and ``fwd_other`` is the remainder."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.in_val = False

    def add(self, name: str, seconds: float) -> None:
        self.acc[name] += seconds


def _instrument(clock: _Clock) -> None:
    import deepspeed.runtime.engine as ds_engine
    import torch.utils.data.dataloader as dl

    import fusemoe.loop as loop

    def timed(fn, train_name: str, val_name: str | None = None):
        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                name = val_name if clock.in_val else train_name
                if name:
                    clock.add(name, time.process_time() - t)

        return wrapper

    base_iter = dl._BaseDataLoaderIter
    base_iter.__next__ = timed(base_iter.__next__, "data", "val_data")
    eng = ds_engine.DeepSpeedEngine
    eng.forward = timed(eng.forward, "forward")
    eng.backward = timed(eng.backward, "backward")
    eng.step = timed(eng.step, "optimizer_step")

    real_predict = loop.predict

    def predict(*a, **k):
        clock.in_val = True
        clock.add("train_end", time.process_time())
        clock.add("train_end_wall", time.perf_counter())
        t = time.process_time()
        try:
            return real_predict(*a, **k)
        finally:
            clock.add("validation", time.process_time() - t)
            clock.in_val = False

    loop.predict = predict

    real_build = loop.build_model

    def build_model(*a, **k):
        model = real_build(*a, **k)
        parts = [(enc, "fwd_mtand") for enc in model.series_encoders.values()]
        if model.static_encoder is not None:
            parts.append((model.static_encoder, "fwd_static"))
        for block in model.blocks:
            parts += [(block.attn, "fwd_attention"), (block.ffn, "fwd_moe")]
        for module, name in parts:
            _hook(module, clock, name)
        _hook(model, clock, None, val_name="val_forward")
        return model

    loop.build_model = build_model


def _hook(module, clock: _Clock, name: str | None, val_name: str | None = None) -> None:
    starts: list[float] = []

    def pre(*_):
        starts.append(time.process_time())

    def post(*_):
        dt = time.process_time() - starts.pop()
        key = val_name if clock.in_val else name
        if clock.in_val and val_name is None:
            return
        if key:
            clock.add(key, dt)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def measure(
    epochs: int, threads: int, data_dir: str, max_train_stays: int, train_set: dict
) -> dict:
    """Trains the default config in this process (whatever tree PYTHONPATH points at)."""
    import torch

    torch.set_num_threads(threads)
    import fusemoe
    import fusemoe.data.dataset as dataset
    import fusemoe.loop as loop
    from pipelines.common import apply_best_params, load_params

    tree = Path(fusemoe.__file__).resolve().parents[1]
    params = apply_best_params(
        load_params(tree / "params.yaml", ("model", "train", "deepspeed")),
        tree / "best_params.yaml",
    )
    params["train"] = {
        **params["train"],
        **train_set,
        "epochs": epochs,
        "max_train_stays": max_train_stays,
    }
    cfg = {"data_dir": data_dir, **{k: params[k] for k in ("model", "train", "deepspeed")}}

    clock = _Clock()
    _instrument(clock)
    epochs_out: list[dict] = []
    marks: dict[str, float] = {}
    real_set_epoch = dataset.ShardBatches.set_epoch

    def set_epoch(self, epoch):
        clock.acc.clear()
        marks["start"], marks["start_cpu"] = time.perf_counter(), time.process_time()
        return real_set_epoch(self, epoch)

    dataset.ShardBatches.set_epoch = set_epoch

    def report(metrics: dict, _ckpt) -> None:
        end, end_cpu = time.perf_counter(), time.process_time()
        acc = dict(clock.acc)
        train_end, train_end_wall = acc.pop("train_end", end_cpu), acc.pop("train_end_wall", end)
        train_s = train_end - marks["start_cpu"]
        fwd = acc.get("forward", 0.0)
        sub = sum(acc.get(k, 0.0) for k in ("fwd_mtand", "fwd_static", "fwd_attention", "fwd_moe"))
        phases = {k: acc.get(k, 0.0) for k in PHASES}
        phases["fwd_other"] = fwd - sub
        phases["train_other"] = train_s - sum(
            acc.get(k, 0.0) for k in ("data", "forward", "backward", "optimizer_step")
        )
        phases["metrics_checkpoint"] = end_cpu - train_end - acc.get("validation", 0.0)
        epochs_out.append(
            {
                "epoch": int(metrics["epoch"]),
                "epoch_cpu_s": end_cpu - marks["start_cpu"],
                "epoch_s": end - marks["start"],
                "train_cpu_s": train_s,
                "train_s": train_end_wall - marks["start"],
                "forward_cpu_s": fwd,
                "phases_cpu_s": phases,
                "train_loss": float(metrics["train_loss"]),
                "val_auroc_ihm": float(metrics.get("val_auroc_ihm", float("nan"))),
            }
        )

    t0 = time.perf_counter()
    loop.train(cfg, report, log=lambda *_: None)
    return {
        "tree": str(tree),
        "total_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "epochs": epochs_out,
    }


# -- the driver --------------------------------------------------------------------------------
def baseline_tree(ref: str) -> Path:
    """``git archive`` of ``ref`` in a temporary directory (the committed code, nothing else)."""
    dest = Path(tempfile.mkdtemp(prefix="epoch-profile-baseline-"))
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def run_one(
    tree: Path, args: argparse.Namespace, train_set: dict, threads: int, world: int = 1
) -> dict:
    """One training process, or `world` data-parallel ranks on a loopback gloo group (as Ray Train
    starts them); the result is rank 0's, with every rank's CPU seconds summed beside it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    if world > 1:
        from ray_jobs.local_cluster import free_port

        env |= {
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),  # one machine, as Ray Train says of local workers
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            out = Path(tmp) / f"rank{rank}.json"
            rank_env = env | ({"RANK": str(rank), "LOCAL_RANK": str(rank)} if world > 1 else {})
            procs.append(
                subprocess.Popen(
                    _worker_cmd(out, args, train_set, threads),
                    env=rank_env,
                    cwd=tempfile.gettempdir(),
                )
            )
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a measured process of {tree} failed")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
    res = ranks[0] | {"world": world}
    for i, epoch in enumerate(res["epochs"]):
        epoch["epoch_cpu_s_all_ranks"] = sum(r["epochs"][i]["epoch_cpu_s"] for r in ranks)
    return res


def _worker_cmd(out: Path, args: argparse.Namespace, train_set: dict, threads: int) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(threads),
        "--data",
        args.data,
        "--max-train-stays",
        str(args.max_train_stays),
        "--train-set",
        json.dumps(train_set),
    ]


def summarise(runs: list[dict]) -> dict:
    """Medians over every measured epoch after each process's first (warm-up) epoch."""
    out = {}
    for code in ("baseline", "current", *UNBUCKETED):
        eps = [e for r in runs if r["code"] == code for e in r["epochs"][1:] or r["epochs"]]
        if not eps:
            continue
        med = {k: statistics.median(e[k] for e in eps) for k in EPOCH_KEYS}
        out[code] = {
            "epochs_measured": len(eps),
            **med,
            "phases_cpu_s": {
                p: statistics.median(e["phases_cpu_s"][p] for e in eps) for p in PHASES
            },
            "val_auroc_ihm": [e["val_auroc_ihm"] for e in eps],
        }
    if "baseline" in out and "current" in out:
        b, c = out["baseline"], out["current"]
        out["speedup"] = {k: b[k] / c[k] for k in EPOCH_KEYS}
        if UNBUCKETED[0] in out:
            u = out[UNBUCKETED[0]]
            out["speedup_without_bucketing"] = {k: b[k] / u[k] for k in EPOCH_KEYS}
        out["speedup"]["validation_cpu_s"] = b["phases_cpu_s"]["validation"] / max(
            c["phases_cpu_s"]["validation"], 1e-9
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", choices=("both", "baseline", "current"), default="both")
    ap.add_argument("--baseline-ref", default="main", help="git ref of today's code")
    ap.add_argument("--baseline-tree", help="an existing checkout to use instead of the ref")
    ap.add_argument("--reps", type=int, default=3, help="processes per code tree")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per process (first = warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (Ray: cpus_per_worker)")
    ap.add_argument(
        "--baseline-threads",
        type=int,
        help="torch threads of the baseline tree (default --threads): each tree at its default",
    )
    ap.add_argument(
        "--world", type=int, default=1, help="data-parallel ranks of this tree (ray.num_workers)"
    )
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--max-train-stays", type=int, default=0, help="0 = the whole train split")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument(
        "--also-unbucketed",
        action="store_true",
        help="also measure the current tree with train.bucket_by_length false",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--train-set", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = measure(
            args.epochs, args.threads, args.data, args.max_train_stays, json.loads(args.train_set)
        )
        Path(args.worker).write_text(json.dumps(res))
        return 0

    sys.path.insert(0, str(ROOT))
    import torch

    from pipelines.common import write_json_atomic

    trees = {}
    if args.code in ("both", "baseline"):
        trees["baseline"] = (
            Path(args.baseline_tree) if args.baseline_tree else baseline_tree(args.baseline_ref)
        )
    if args.code in ("both", "current"):
        trees["current"] = ROOT
        if args.also_unbucketed:
            trees[UNBUCKETED[0]] = ROOT
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
    )
    result = {
        "benchmark": "epoch_profile",
        "command": "python benchmarks/epoch_profile.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": "params.yaml + best_params.yaml (train.epochs and max_train_stays overridden)",
        "epochs_per_process": args.epochs,
        "torch_threads": args.threads,
        "world": args.world,
        "baseline_world": 1,
        "baseline_torch_threads": args.baseline_threads or args.threads,
        "data": args.data,
        "baseline_ref": args.baseline_tree or args.baseline_ref,
        "current_commit": head + ("+uncommitted" if dirty else ""),
        "times": "phase and *_cpu_s figures: process CPU seconds; epoch_s / train_s: wall",
        "phases": {
            "data": "DataLoader __next__: __getitem__ + collate",
            "fwd_*": "forward hooks inside DeepSpeedEngine.forward; fwd_other = the rest",
            "train_other": "train wall - data - forward - backward - step (loss, syncs, loop)",
            "validation": "fusemoe.loop.predict over the val split (val_data + val_forward ...)",
            "metrics_checkpoint": "after predict until report(): metrics, checkpoint save",
        },
        "runs": [],
    }
    order = list(trees)
    for rep in range(args.reps):
        for code in order if rep % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            # Explicit either way, so the figures do not follow a change of the default.
            train_set = {"bucket_by_length": code not in UNBUCKETED} if code != "baseline" else {}
            threads = args.threads
            if code == "baseline" and args.baseline_threads:
                threads = args.baseline_threads
            # The baseline runs one rank, as its default (ray.num_workers: 1) did.
            world = 1 if code == "baseline" else args.world
            res = run_one(trees[code], args, train_set, threads, world)
            res.update(code=code, rep=rep, wall_s=time.perf_counter() - t)
            result["runs"].append(res)
            result["summary"] = summarise(result["runs"])
            write_json_atomic(args.out, result)
            eps = ", ".join(f"{e['epoch_cpu_s']:.1f}/{e['epoch_s']:.1f}" for e in res["epochs"])
            print(f"rep {rep} {code}: epoch cpu/wall s [{eps}]", flush=True)
    print(json.dumps(result["summary"], indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
