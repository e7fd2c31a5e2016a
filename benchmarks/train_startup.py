"""Where the train stage's fixed start-up goes: `python -m pipelines.train` on a tiny dataset
(synthetic, 200 stays, 1 epoch, the tests' tiny model), so fixed costs dominate.

Each run is a fresh process of the real stage (embedded Ray, TorchTrainer, DeepSpeed, MLflow on
SQLite), timed at the stage's own function boundaries from the outside: the child wraps
`mlflow_run_for`, `init_ray`, `dataset_uri` and `run_training`, and its train_fn (fusemoe.loop.train
behind a timing wrapper) records on the worker when it was entered, `deepspeed.init_distributed`,
the dataset open, `deepspeed.initialize` and the first optimizer step. The baseline is another
commit (default: main, unpacked with git archive) put first on PYTHONPATH; runs alternate between
baseline and current under the same machine load.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train_startup.py [--baseline-ref main] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()  # the child's process start, as near as Python gets

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "train_startup_cpu.json"
NOTE = (
    "Seconds per phase, median of the runs; runs alternate between variants. Wall times include "
    "whatever else the machine runs (see load_avg_1m_before); cpu_s_process_tree (the stage "
    "process and every process under it, Ray's included, sampled every 0.25 s) is the steadier "
    "figure. current_bytecode: this tree with site-packages and the stdlib compiled to bytecode "
    "(PYTHONPYCACHEPREFIX), which is what `make install` now leaves in .venv."
)
TINY_MODEL = dict(
    d_model=16, n_heads=2, n_layers=1, num_ref_points=4, num_experts=4, top_k=2, expert_hidden=32
)


def _log(events: Path, **event) -> None:
    with events.open("a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **event}) + "\n")


def timed_train(events: Path):
    """fusemoe.loop.train with timestamps of its start-up phases, taken on the worker."""

    def train_fn(cfg: dict, report, restore_dir=None) -> dict:
        import psutil

        _log(events, phase="worker_entered", proc_created=psutil.Process().create_time())
        import deepspeed

        _log(events, phase="deepspeed_imported")
        from fusemoe import loop
        from fusemoe.data import dataset as ds_mod

        def wrap(owner, name, label):
            inner = getattr(owner, name)

            def timed(*a, **k):
                _log(events, phase=f"{label}_start")
                out = inner(*a, **k)
                _log(events, phase=f"{label}_end")
                return out

            setattr(owner, name, timed)

        wrap(deepspeed, "init_distributed", "init_distributed")
        wrap(deepspeed, "initialize", "deepspeed_initialize")
        init = ds_mod.FlexiModalDataset.__init__
        first = {"open": True}

        def dataset_init(self, *a, **k):
            if first["open"]:
                _log(events, phase="dataset_open_start")
            init(self, *a, **k)
            if first["open"]:
                _log(events, phase="dataset_open_end")
                first["open"] = False

        ds_mod.FlexiModalDataset.__init__ = dataset_init
        ds_init = deepspeed.initialize

        def initialize(*a, **k):
            out = ds_init(*a, **k)
            engine = out[0]
            step = engine.step
            done = {"first": False}

            def first_step(*sa, **sk):
                r = step(*sa, **sk)
                if not done["first"]:
                    done["first"] = True
                    _log(events, phase="first_step_end")
                return r

            engine.step = first_step
            return out

        deepspeed.initialize = initialize
        res = loop.train(cfg, report, restore_dir)
        _log(events, phase="train_fn_end")
        return res

    return train_fn


def child(events: Path) -> None:
    """One `python -m pipelines.train` in this process, with timestamps at its boundaries."""
    import atexit
    import threading

    _log(events, phase="process_start", at=T_START)
    atexit.register(lambda: _log(events, phase="atexit_last"))  # atexit runs last-in, first-out
    import pipelines.train as stage

    _log(events, phase="imported_pipelines_train")
    import ray_jobs.train as rt

    _log(events, phase="imported_ray_jobs_train")
    from ray_jobs import storage

    def wrap(owner, name, label, **kw):
        inner = getattr(owner, name)

        def timed(*a, **k):
            _log(events, phase=f"{label}_start")
            out = inner(*a, **k, **kw)
            _log(events, phase=f"{label}_end")
            return out

        setattr(owner, name, timed)

    wrap(stage, "mlflow_run_for", "mlflow_setup")
    wrap(rt, "init_ray", "ray_init")
    wrap(storage, "dataset_uri", "dataset_uri")
    wrap(rt, "run_training", "run_training", train_fn=timed_train(events))
    sys.argv = ["pipelines.train", "--params", "params.yaml"]
    stage.main()
    _log(events, phase="main_end")
    import ray

    ray.shutdown()  # what atexit would do, timed
    threads = [t.name for t in threading.enumerate() if not t.daemon and t.name != "MainThread"]
    _log(events, phase="ray_shutdown_end", non_daemon_threads=threads)
    atexit.register(lambda: _log(events, phase="atexit_first"))


def phases(events: list[dict], wall_s: float) -> dict:
    """Seconds per start-up phase, from the child's and the worker's timestamps."""
    t = {}
    for e in events:
        t.setdefault(e["phase"], e["t"])
    t0 = events[0]["at"]

    def d(a: str, b: str) -> float | None:
        return round(t[b] - t[a], 2) if a in t and b in t else None

    t["t0"] = t0
    return {
        "python_and_stage_imports": d("t0", "imported_ray_jobs_train"),
        "config_and_data_hash": d("imported_ray_jobs_train", "mlflow_setup_start"),
        "mlflow_setup": d("mlflow_setup_start", "mlflow_setup_end"),
        "to_run_training": d("mlflow_setup_end", "run_training_start"),
        "ray_init": d("ray_init_start", "ray_init_end"),
        "trainer_to_worker_loop": d("ray_init_end", "worker_entered"),
        "worker_import_deepspeed": d("worker_entered", "deepspeed_imported"),
        "init_distributed": d("init_distributed_start", "init_distributed_end"),
        "dataset_open": d("dataset_open_start", "dataset_open_end"),
        "deepspeed_initialize": d("deepspeed_initialize_start", "deepspeed_initialize_end"),
        "first_step": d("deepspeed_initialize_end", "first_step_end"),
        "start_to_first_step": d("t0", "first_step_end"),
        "epoch_and_checkpoint": d("first_step_end", "train_fn_end"),
        "fit_teardown": d("train_fn_end", "run_training_end"),
        "after_training": d("run_training_end", "main_end"),
        "ray_shutdown": d("main_end", "ray_shutdown_end"),
        "join_threads": d("ray_shutdown_end", "atexit_first"),
        "atexit_handlers": d("atexit_first", "atexit_last"),
        "interpreter_finalize": round(wall_s - (t["atexit_last"] - t0), 2),
        "process_wall": round(wall_s, 2),
    }


def prepare(work: Path) -> None:
    """A tiny synthetic dataset and a params.yaml that trains it for one epoch."""
    import yaml

    from fusemoe.data.synthetic import write_synthetic

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    write_synthetic(work / "data", num_stays=200, seed=3)
    params["data"].update(source="synthetic", out_dir=str(work / "data"))
    params["model"].update(TINY_MODEL)
    params["train"].update(epochs=1, use_best_params=False)
    params["ray"].update(storage_path=str(work / "runs"))
    params["mlflow"].update(tracking_uri=f"sqlite:///{work}/mlflow.db")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    # The store as the tune stage leaves it (schema created): train's own cost, not a first-ever DB.
    import mlflow

    mlflow.MlflowClient(params["mlflow"]["tracking_uri"]).search_experiments()


def run_once(label: str, code: Path, work: Path, run: int, env_extra: dict) -> dict:
    events = work / f"events-{label}-{run}.jsonl"
    env = {
        **env_extra,
        **os.environ,
        "PYTHONPATH": str(code),
        "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", f"/tmp/ray-tsu{os.getpid()}"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DVC_NO_ANALYTICS": "1",
    }
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    t = time.perf_counter()
    with (work / f"log-{label}-{run}.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(events)],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        cpu = _tree_cpu(proc)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (work / f"log-{label}-{run}.txt").read_text()[-4000:]
        raise RuntimeError(f"{label} run failed:\n{tail}")
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    return {**phases(evs, wall), **cpu}


def _tree_cpu(proc: subprocess.Popen, every_s: float = 0.25) -> dict:
    """CPU seconds of the child and every process it (or Ray under it) started, sampled until
    the child exits: wall time on a shared machine mostly measures the neighbours, CPU less so.
    A process's last `every_s` before it exits can be missed (an undercount, the same for both)."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    seen[(p.pid, p.create_time())] = c.user + c.system
            except psutil.Error:
                pass
        time.sleep(every_s)
    return {"cpu_s_process_tree": round(sum(seen.values()), 2), "processes": len(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-ref", default="main")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--pycache-prefix",
        type=Path,
        help="also time the current tree with bytecode from this PYTHONPYCACHEPREFIX (a "
        "compileall of site-packages and the stdlib: what `make install` now leaves in .venv)",
    )
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="tsu-") as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline_ref], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", args.baseline_ref], capture_output=True, text=True
        ).stdout.strip()
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        results: dict = {
            "what": "python -m pipelines.train, synthetic 200 stays, tiny model, 1 epoch, 1 worker",
            "baseline": {"ref": args.baseline_ref, "sha": sha, "runs": []},
            "current": {"sha": head, "dirty": bool(_dirty()), "runs": []},
            "cpus": os.cpu_count(),
            "note": NOTE,
        }
        variants = [("baseline", base, {}), ("current", REPO, {})]
        if args.pycache_prefix:
            cache = {"PYTHONPYCACHEPREFIX": str(args.pycache_prefix)}
            variants.append(("current_bytecode", REPO, cache))
            results["current_bytecode"] = {"sha": head, "pycache_prefix": str(args.pycache_prefix)}
            results["current_bytecode"]["runs"] = []
        for rep in range(args.reps):
            for label, code, env_extra in variants:
                work = tmp / f"work-{label}-{rep}"
                work.mkdir()
                prepare(work)
                load = os.getloadavg()[0]
                r = run_once(label, code, work, rep, env_extra)
                r["load_avg_1m_before"] = round(load, 2)
                results[label]["runs"].append(r)
                print(label, rep, json.dumps(r), flush=True)
                _summarise(results)
                _write(results)


def _dirty() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "ray_jobs", "pipelines"],
        capture_output=True,
        text=True,
    ).stdout


def _summarise(results: dict) -> None:
    """Median per phase (of the runs so far) and the saving, current vs baseline."""
    import statistics

    med = {}
    for label in [k for k in ("baseline", "current", "current_bytecode") if k in results]:
        runs = results[label]["runs"]
        keys = runs[0].keys() if runs else ()
        med[label] = {
            k: round(statistics.median(r[k] for r in runs if r.get(k) is not None), 2)
            for k in keys
            if any(r.get(k) is not None for r in runs)
        }
        results[label]["median"] = med[label]
    b = med["baseline"]
    for label in [k for k in med if k != "baseline"]:
        c = med[label]
        results[f"saved_s_median_{label}"] = {
            k: round(b[k] - c[k], 2) for k in b if k in c and k != "load_avg_1m_before"
        }


def _write(results: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(OUT)


if __name__ == "__main__":
    main()
