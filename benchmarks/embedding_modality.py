"""Embedding modalities (issue 16): does FuseMoE use a modality that only vectors reveal, and what
does preparing a large one cost?

Study: the synthetic set with its 32-d `note` embedding modality (`synthesize(note_width=32)`: the
ihm label needs the note's latent). Per seed (data, split and model seeds alike), FuseMoE and the
dense baseline (`model.moe: false`) train on the data with the note and on the same stays without
it (the note modality removed from the manifest). Every model trains through the shipped loop
(`fusemoe.loop.train`, the train stage's, via benchmarks/shipped_loop.py) for a fixed number of
epochs; the epoch is chosen on validation AUROC, test is scored once. The models trained with the note are also scored with the note removed (MCAR) for
0/20/40/60/80% of the test stays. Reported: test AUROC mean ± sd over the seeds.

Cost: `prepare` (data.source: flexi, i.e. read + validate + statistics + write) of a FlexiModal
directory with a 10^5-row embedding modality of width 768, in a subprocess: wall and CPU time and
peak RSS (and the RSS of the interpreter with its imports before prepare starts).

Run (from the repo root; about 8 min on a busy 2-core machine):
    nice -n 10 .venv/bin/python benchmarks/embedding_modality.py
Results: benchmarks/results/embedding_modality.json, rewritten after every finished run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shipped_loop import LOOP, train_keeping_best  # noqa: E402
from fusemoe.data.dataset import FlexiModalDataset, collate  # noqa: E402
from fusemoe.data.flexi import write_flexi  # noqa: E402
from fusemoe.data.synthetic import NOTE, synthesize  # noqa: E402
from fusemoe.inference import predict  # noqa: E402
from fusemoe.metrics import binary_metrics  # noqa: E402
from pipelines.common import write_json_atomic  # noqa: E402

TASK = "ihm"
OUT = ROOT / "benchmarks" / "results" / "embedding_modality.json"
NOTE_MISSING = (0.0, 0.2, 0.4, 0.6, 0.8)
# Small CPU models: the params.yaml shape scaled down so 12 trainings fit the time budget.
MODEL = dict(
    d_model=32,
    n_heads=2,
    n_layers=1,
    num_ref_points=8,
    num_experts=4,
    top_k=2,
    expert_hidden=64,
    gate="laplace",
    router="per_modality",
    dropout=0.1,
)
PRIMARY = f"val_auroc_{TASK}"
# The shipped loop's `train`/`deepspeed` sections; fixed epochs, the best on validation is kept.
TRAIN = dict(
    tasks=[TASK],
    primary_metric=PRIMARY,
    epochs=12,
    batch_size=64,
    lr=3e-3,
    lr_schedule="constant",
    weight_decay=1e-4,
)
DEEPSPEED = dict(zero_stage=0, precision="fp32", grad_clip=1.0, ep_size=1)


def note_dropped(fraction: float, seed: int):
    """Batch transform: the note is missing (present flag cleared) for each test stay with
    probability `fraction`, the same stays for every model (seeded by stay id)."""

    def transform(batch: dict) -> dict:
        u = np.array([np.random.default_rng([seed, int(s[1:])]).random() for s in batch["stay_id"]])
        keep = torch.from_numpy(u >= fraction)
        return {**batch, "present": {**batch["present"], NOTE: batch["present"][NOTE] & keep}}

    return transform


def write_data(root: Path, num_stays: int, seed: int, width: int) -> dict[str, Path]:
    """The synthetic set with the note, and the same stays and events without it."""
    stays, events, manifest, embeddings = synthesize(num_stays, seed, note_width=width)
    with_note, without = root / f"with_note_{seed}", root / f"without_note_{seed}"
    write_flexi(with_note, stays, events, manifest, embeddings=embeddings)
    bare = copy.deepcopy(manifest)
    bare["modalities"] = [m for m in bare["modalities"] if m["name"] != NOTE]
    write_flexi(without, stays, events, bare)
    return {"with_note": with_note, "without_note": without}


def train_and_score(data_dir: Path, model_params: dict, seed: int, sweep: bool) -> dict:
    """Trains through the shipped loop (`fusemoe.loop.train`, see benchmarks/shipped_loop.py);
    the epoch with the best validation AUROC is kept and scored on test."""
    t0 = time.perf_counter()
    sections = {"model": model_params, "train": TRAIN, "deepspeed": DEEPSPEED}
    trained = train_keeping_best(data_dir, sections, seed, log=lambda *_: None)
    loader = torch.utils.data.DataLoader(
        FlexiModalDataset(data_dir, "test", tasks=[TASK]),
        batch_size=4 * TRAIN["batch_size"],
        collate_fn=collate,
    )

    def auroc(transform=None) -> float:
        pred = predict(trained.model, loader, torch.device("cpu"), transform)
        logits = pred["logits"][TASK].reshape(-1)
        return binary_metrics(pred["labels"][TASK].reshape(-1), 1 / (1 + np.exp(-logits)))["auroc"]

    result = {
        "epoch": trained.best["epoch"],
        "val_auroc": trained.best[PRIMARY],
        "test_auroc": auroc(),
        "val_history": [round(h[PRIMARY], 4) for h in trained.history],
        "train_s": round(time.perf_counter() - t0, 1),
    }
    if sweep:
        result["test_auroc_note_missing"] = {
            f"{f:.0%}": auroc(note_dropped(f, seed)) for f in NOTE_MISSING
        }
    return result


def summarise(runs: list[dict]) -> dict:
    """mean ± sd (over seeds) of every test AUROC, per model and data variant."""
    out: dict = {}
    for r in runs:
        key = f"{r['model']}/{r['data']}"
        out.setdefault(key, {"test_auroc": [], "note_missing": {}})
        out[key]["test_auroc"].append(r["test_auroc"])
        for f, v in r.get("test_auroc_note_missing", {}).items():
            out[key]["note_missing"].setdefault(f, []).append(v)

    def ms(v: list[float]) -> dict:
        return {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v)), 4), "n": len(v)}

    return {
        k: {"test_auroc": ms(v["test_auroc"])}
        | (
            {"note_missing": {f: ms(x) for f, x in v["note_missing"].items()}}
            if v["note_missing"]
            else {}
        )
        for k, v in out.items()
    }


# Memory from /proc/self/status: VmHWM (this process image's peak RSS) and VmRSS, since
# ru_maxrss survives exec and would include the RSS of the forking benchmark process.
PREPARE_SCRIPT = """
import json, resource, sys, time
from pipelines.prepare import prepare
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def status_mb(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
rss0 = status_mb("VmRSS")
t, c = time.perf_counter(), cpu()
m = prepare({"source": "flexi", "flexi_dir": sys.argv[1], "out_dir": sys.argv[2]})
print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": cpu() - c,
                  "rss_before_mb": rss0, "peak_rss_mb": status_mb("VmHWM"),
                  "vectors": m["counts"]["events_per_modality"]["note"]}))
"""


def prepare_cost(rows: int, width: int, root: Path) -> dict:
    """Write a FlexiModal source with `rows` note vectors of `width`, then time `prepare` on it."""
    rng = np.random.default_rng(0)
    n_stays = rows // 5
    ids = np.array([f"s{i:06d}" for i in range(n_stays)])
    src = root / "flexi_src"
    stays = pa.table(
        {
            "stay_id": ids,
            "split": rng.choice(["train", "val", "test"], n_stays, p=[0.7, 0.15, 0.15]),
            "ihm": rng.integers(0, 2, n_stays).astype(np.int8),
        }
    )
    events = pa.table(
        {
            "stay_id": ids,
            "modality": pa.array(["vitals"] * n_stays).dictionary_encode(),
            "variable": pa.array(["HR"] * n_stays).dictionary_encode(),
            "time_h": np.zeros(n_stays, np.float32),
            "value": rng.normal(80, 10, n_stays).astype(np.float32),
        }
    )
    manifest = {
        "modalities": [
            {"name": "vitals", "kind": "series", "variables": ["HR"]},
            {"name": NOTE, "kind": "embedding", "width": width},
        ],
        "tasks": [{"name": "ihm", "kind": "binary"}],
    }
    vectors = rng.standard_normal((rows, width), dtype=np.float32)
    notes = pa.table(
        {
            "stay_id": np.repeat(ids, 5),
            "time_h": np.tile(np.arange(5, dtype=np.float32) * 8, n_stays),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), width),
        }
    )
    (src / "embeddings").mkdir(parents=True)
    pq.write_table(stays, src / "stays.parquet")
    pq.write_table(events, src / "events.parquet")
    pq.write_table(notes, src / "embeddings" / f"{NOTE}.parquet")
    (src / "manifest.json").write_text(json.dumps(manifest))
    del vectors, notes
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PREPARE_SCRIPT, str(src), str(root / "flexi_out")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size = (src / "embeddings" / f"{NOTE}.parquet").stat().st_size
    return {
        "rows": rows,
        "width": width,
        "stays": n_stays,
        "source_file_mb": round(size / 2**20, 1),
        "wall_s": round(result["wall_s"], 2),
        "cpu_s": round(result["cpu_s"], 2),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "rss_before_prepare_mb": round(result["rss_before_mb"], 1),  # python + imports
        "vector_data_mb": round(rows * width * 4 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--prepare-rows", type=int, default=100_000)
    parser.add_argument("--prepare-width", type=int, default=768)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--prepare-only", action="store_true", help="re-measure prepare_cost in the existing --out"
    )
    args = parser.parse_args(argv)
    if args.prepare_only:
        report = json.loads(args.out.read_text())
        with tempfile.TemporaryDirectory(prefix="fusemoe-embed-bench-") as tmp:
            report["prepare_cost"] = prepare_cost(args.prepare_rows, args.prepare_width, Path(tmp))
        report["prepare_command"] = " ".join([Path(sys.executable).name, *sys.argv])
        write_json_atomic(args.out, report)
        print("prepare:", report["prepare_cost"])
        return 0
    torch.set_num_threads(1)
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
        },
        "settings": {
            "stays": args.stays,
            "seeds": args.seeds,
            "note_width": args.width,
            "model": MODEL,
            "train": TRAIN,
            "deepspeed": DEEPSPEED,
            "training_loop": LOOP,
            "note_missing": list(NOTE_MISSING),
        },
        "runs": [],
        "complete": False,
    }

    def save() -> None:
        report["summary"] = summarise(report["runs"])
        write_json_atomic(args.out, report)

    with tempfile.TemporaryDirectory(prefix="fusemoe-embed-bench-") as tmp:
        report["prepare_cost"] = prepare_cost(args.prepare_rows, args.prepare_width, Path(tmp))
        print("prepare:", report["prepare_cost"], flush=True)
        save()
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory(prefix="fusemoe-embed-bench-") as tmp:
            dirs = write_data(Path(tmp), args.stays, seed, args.width)
            for model_name, moe in (("fusemoe", True), ("dense", False)):
                for data_name, data_dir in dirs.items():
                    params = MODEL | {"moe": moe}
                    r = train_and_score(data_dir, params, seed, sweep=data_name == "with_note")
                    report["runs"].append(
                        {"seed": seed, "model": model_name, "data": data_name} | r
                    )
                    print(
                        f"seed {seed} {model_name} {data_name}: test AUROC {r['test_auroc']:.4f} "
                        f"(epoch {r['epoch']}, {r['train_s']:.0f}s)",
                        flush=True,
                    )
                    save()
    report["complete"] = True
    save()
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
