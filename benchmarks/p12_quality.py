"""In-hospital mortality on PhysioNet 2012: FuseMoE configurations vs classical baselines.

Protocol of the published P12 results: 5 seeds of stratified random 80/10/10 splits of all stays;
every choice (hyperparameters, number of trees, epoch) is made on validation, test is scored once.
Each configuration is a named entry of ``CONFIGS``. Every finished (config, seed) run is appended to
a JSONL cache keyed by a fingerprint of its settings, so rerunning skips what is done and a changed
setting reruns only what it affects. The summary JSON aggregates the cache for the current settings.

Run (from the repo root, after ``python -m pipelines.prepare``):
    nice -n 10 .venv/bin/python benchmarks/p12_quality.py --configs gbm logreg
    nice -n 10 .venv/bin/python benchmarks/p12_quality.py --configs fusemoe_laplace --epochs 4
FuseMoE entries train with ``fusemoe.loop.train``, the loop the train stage's Ray workers run
(here on a one-rank gloo group, no Ray), for params.yaml's ``train.epochs``; the epoch with the best
validation AUROC is kept. Each run uses a per-seed copy of the FlexiModal directory (under runs/,
not committed) whose split column is the seed's split and whose normalisation statistics come from
its train part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.stats
import sklearn
import torch
import yaml
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shipped_loop import LOOP, train_keeping_best  # noqa: E402
from fusemoe.baselines import fit_gbm, fit_logreg, labels, read_flexi_frames, summary_features  # noqa: E402
from fusemoe.data.flexi import EVENTS_FILE, STAYS_FILE, assign_splits, load_manifest, write_flexi  # noqa: E402
from fusemoe.metrics import binary_metrics  # noqa: E402

TASK = "ihm"
# FuseMoE entries train with the train stage's loop; cached rows of the benchmark's former own
# loop lack this mark and are left out of the summary.
FRACTIONS = (0.8, 0.1, 0.1)
RESULTS = ROOT / "benchmarks" / "results"
# Published P12 mortality results, mean over 5 splits (AUROC, AUPRC in %), as listed in issue 5.
PUBLISHED = {
    "mTAND": (84.2, 48.2),
    "Raindrop": (82.8, 44.0),
    "ViTST": (85.1, 51.1),
    "Warpformer": (86.5, 54.3),
    "GraFITi": (86.6, 54.8),
    "MTM (2025)": (88.0, 58.6),
}


@dataclass
class Entry:
    """A configuration: ``kind`` is gbm | logreg | fusemoe; ``model`` / ``train`` override the
    params.yaml ``model`` section / the benchmark's training settings."""

    kind: str
    description: str
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


# Train overrides shared by several entries: weight averaging with a cosine schedule, and length
# of stay as an auxiliary task (standardised days, weight 0.3).
EMA_COSINE = {"ema_decay": 0.99, "lr_schedule": "cosine", "warmup_epochs": 1}
LOS_AUX = {"tasks": ["ihm", "los_days"], "task_weights": {"los_days": 0.3}}

CONFIGS: dict[str, Entry] = {
    "gbm": Entry("gbm", "HistGradientBoosting on per-variable summaries + static"),
    "logreg": Entry("logreg", "Logistic regression (median impute + indicators, standardised)"),
    "fusemoe_laplace": Entry(
        "fusemoe",
        "FuseMoE, Laplace gate, per-modality routers, entropy regularizer",
        {"gate": "laplace", "router": "per_modality", "moe": True},
    ),
    "fusemoe_softmax": Entry(
        "fusemoe",
        "FuseMoE, softmax gate, per-modality routers, entropy regularizer",
        {"gate": "softmax", "router": "per_modality", "moe": True},
    ),
    "fusemoe_gaussian": Entry(
        "fusemoe",
        "FuseMoE, Gaussian gate, per-modality routers, entropy regularizer",
        {"gate": "gaussian", "router": "per_modality", "moe": True},
    ),
    "dense": Entry(
        "fusemoe", "Same model, dense FFN instead of MoE (no-MoE baseline)", {"moe": False}
    ),
    # Larger variants, tried on seed 0's validation split before the 5-seed runs.
    "fusemoe_laplace_wide": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; d 128, 8 heads, 32 reference points, expert hidden 256",
        {
            "gate": "laplace",
            "router": "per_modality",
            "d_model": 128,
            "n_heads": 8,
            "num_ref_points": 32,
            "expert_hidden": 256,
        },
    ),
    "fusemoe_laplace_mdrop": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; modality dropout 0.2 while training",
        {"gate": "laplace", "router": "per_modality"},
        {"modality_dropout": 0.2},
    ),
    "fusemoe_laplace_cosine": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; 1 warmup epoch, cosine decay over 8 epochs",
        {"gate": "laplace", "router": "per_modality"},
        {"lr_schedule": "cosine", "warmup_epochs": 1, "epochs": 8},
    ),
    "fusemoe_laplace_reg": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; dropout 0.3, weight decay 0.05",
        {"gate": "laplace", "router": "per_modality", "dropout": 0.3},
        {"weight_decay": 0.05},
    ),
    "fusemoe_laplace_cosine_reg": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; cosine over 8 epochs, dropout 0.3, weight decay 0.05",
        {"gate": "laplace", "router": "per_modality", "dropout": 0.3},
        {"lr_schedule": "cosine", "warmup_epochs": 1, "epochs": 8, "weight_decay": 0.05},
    ),
    "fusemoe_laplace_counts": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; mTAND tokens carry log(1 + count) per variable",
        {"gate": "laplace", "router": "per_modality", "count_features": True},
    ),
    "fusemoe_laplace_summary": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; plus a token of per-variable summaries (what GBM sees)",
        {"gate": "laplace", "router": "per_modality", "summary_token": True},
    ),
    "fusemoe_laplace_summary_cosine": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; summary token, 1 warmup epoch, cosine decay over 8 epochs",
        {"gate": "laplace", "router": "per_modality", "summary_token": True},
        {"lr_schedule": "cosine", "warmup_epochs": 1, "epochs": 8},
    ),
    "fusemoe_laplace_summary_reg": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; summary token, dropout 0.3, weight decay 0.05",
        {"gate": "laplace", "router": "per_modality", "summary_token": True, "dropout": 0.3},
        {"weight_decay": 0.05},
    ),
    "fusemoe_laplace_ema99": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; validated and saved weights = EMA (decay 0.99) of the steps",
        {"gate": "laplace", "router": "per_modality"},
        {"ema_decay": 0.99},
    ),
    "fusemoe_laplace_ema995": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; validated and saved weights = EMA (decay 0.995) of the steps",
        {"gate": "laplace", "router": "per_modality"},
        {"ema_decay": 0.995},
    ),
    "fusemoe_laplace_ema99_cosine": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, 1 warmup epoch, cosine decay over 8 epochs",
        {"gate": "laplace", "router": "per_modality"},
        EMA_COSINE,
    ),
    "fusemoe_laplace_ema99_lr5e4": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, lr 5e-4 for 12 epochs",
        {"gate": "laplace", "router": "per_modality"},
        {"ema_decay": 0.99, "lr": 0.0005, "epochs": 12},
    ),
    "fusemoe_laplace_ema99_ref48": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, 48 reference points (the paper's)",
        {"gate": "laplace", "router": "per_modality", "num_ref_points": 48},
        {"ema_decay": 0.99},
    ),
    "fusemoe_laplace_ema99_los": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, auxiliary length of stay (standardised, weight 0.3)",
        {"gate": "laplace", "router": "per_modality"},
        {"ema_decay": 0.99} | LOS_AUX,
    ),
    "fusemoe_laplace_ema99_cosine_los": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, cosine over 8 epochs (1 warmup), auxiliary "
        "length of stay (standardised, weight 0.3)",
        {"gate": "laplace", "router": "per_modality"},
        EMA_COSINE | LOS_AUX,
    ),
    "fusemoe_laplace_los": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; auxiliary length of stay (standardised days, weight 0.3)",
        {"gate": "laplace", "router": "per_modality"},
        LOS_AUX,
    ),
    "fusemoe_laplace_losgt7": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; auxiliary length of stay > 7 days (binary, weight 0.3)",
        {"gate": "laplace", "router": "per_modality"},
        {"tasks": ["ihm", "los_gt7"], "task_weights": {"los_gt7": 0.3}},
    ),
    "fusemoe_laplace_wide_ema99_cosine": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; d 128, 8 heads, 32 reference points, expert hidden 256; "
        "EMA 0.99, cosine over 8 epochs (1 warmup)",
        {
            "gate": "laplace",
            "router": "per_modality",
            "d_model": 128,
            "n_heads": 8,
            "num_ref_points": 32,
            "expert_hidden": 256,
        },
        EMA_COSINE,
    ),
    "fusemoe_laplace_ema99_cosine16_los": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, cosine over 16 epochs (1 warmup), auxiliary "
        "length of stay (standardised, weight 0.3)",
        {"gate": "laplace", "router": "per_modality"},
        EMA_COSINE | LOS_AUX | {"epochs": 16},
    ),
    "fusemoe_laplace_ema99_cosine_los_clip5": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, cosine over 8 epochs (1 warmup), auxiliary "
        "length of stay (0.3); standardised values clamped to +-5",
        {"gate": "laplace", "router": "per_modality", "value_clip": 5.0},
        EMA_COSINE | LOS_AUX,
    ),
    "fusemoe_laplace_ema99_cosine_los_summary": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, cosine over 8 epochs (1 warmup), auxiliary "
        "length of stay (0.3); plus a token of per-variable summaries (what GBM sees)",
        {"gate": "laplace", "router": "per_modality", "summary_token": True},
        EMA_COSINE | LOS_AUX,
    ),
    "fusemoe_laplace_ema99_cosine_los_bucketed": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; EMA 0.99, cosine, auxiliary length of stay (0.3), "
        "training batches bucketed by length",
        {"gate": "laplace", "router": "per_modality"},
        EMA_COSINE | LOS_AUX | {"bucket_by_length": True},
    ),
    "fusemoe_laplace_bucketed": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; training batches bucketed by length",
        {"gate": "laplace", "router": "per_modality"},
        {"bucket_by_length": True},
    ),
    "fusemoe_laplace_x5": Entry(
        "fusemoe",
        "Ensemble of 5 FuseMoE-Laplace models (seeds s + 1000 i), probabilities averaged",
        {"gate": "laplace", "router": "per_modality", "moe": True},
        {"ensemble": 5},
    ),
    "fusemoe_laplace_2layer": Entry(
        "fusemoe",
        "FuseMoE, Laplace, per-modality; two MoE Transformer blocks",
        {"gate": "laplace", "router": "per_modality", "n_layers": 2},
    ),
}


# ----------------------------------------------------------------------------- cache


def fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def code_digest() -> str:
    """Digest of the model, loop and data-loading source, so a code change reruns FuseMoE entries."""
    files = sorted((ROOT / "fusemoe" / "nn").glob("*.py")) + [
        ROOT / "fusemoe" / f for f in ("data/dataset.py", "loop.py", "model_io.py", "inference.py")
    ]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def read_cache(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_cache(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- classical


def run_classical(
    entry: Entry, features: np.ndarray, y: np.ndarray, split: np.ndarray, seed: int
) -> dict:
    tr, va, te = ((split == s) & ~np.isnan(y) for s in ("train", "val", "test"))
    fit = fit_gbm if entry.kind == "gbm" else fit_logreg
    kwargs = {"seed": seed} if entry.kind == "gbm" else {}
    sel = fit(features[tr], y[tr], features[va], y[va], **kwargs)
    p_val = sel.model.predict_proba(features[va])[:, 1]
    p_test = sel.model.predict_proba(features[te])[:, 1]
    return {
        "chosen": sel.params,
        "val": binary_metrics(y[va], p_val),
        "test": binary_metrics(y[te], p_test),
        "grid": sel.grid,
    }


# ----------------------------------------------------------------------------- FuseMoE


def seed_dir(source: Path, cache_root: Path, seed: int, split: np.ndarray) -> Path:
    """A FlexiModal copy of ``source`` with this seed's split (train-only norm statistics)."""
    manifest = load_manifest(source)
    digest = fingerprint({"files": manifest.get("files", {}), "split": split.tolist()})
    target = cache_root / f"seed{seed}"
    done = target / "manifest.json"
    if done.exists() and load_manifest(target).get("benchmark_split_digest") == digest:
        return target
    stays = pq.read_table(source / STAYS_FILE)
    stays = stays.set_column(
        stays.schema.get_field_index("split"), "split", pa.array(split, pa.string())
    )
    events = pq.read_table(source / EVENTS_FILE)
    keep = {"source", "source_hashes", "modalities", "tasks", "sets", "cleaning", "source_url"}
    new = {k: v for k, v in manifest.items() if k in keep}
    new["split"] = {"fractions": list(FRACTIONS), "seed": seed, "stratify": TASK}
    new["benchmark_split_digest"] = digest
    write_flexi(target, stays, events, new)
    return target


def run_fusemoe(entry: Entry, data_dir: Path, cfg: dict, seed: int, log: Callable) -> dict:
    """Trains ``train.ensemble`` members (default 1; member i seeded ``seed + 1000 i``) and
    averages their probabilities; each member's epoch is chosen on validation."""
    members = [
        train_member(data_dir, cfg, seed + 1000 * i, log)
        for i in range(int(cfg["train"].get("ensemble", 1)))
    ]
    y = members[0]["labels"]
    mean_p = {s: np.mean([m["probs"][s] for m in members], axis=0) for s in ("val", "test")}
    result = {
        "val": binary_metrics(y["val"], mean_p["val"]),
        "test": binary_metrics(y["test"], mean_p["test"]),
        "num_params": members[0]["num_params"] * len(members),
    }
    if len(members) == 1:
        return result | {"chosen": {"epoch": members[0]["epoch"]}, "history": members[0]["history"]}
    return result | {
        "chosen": {"epoch": [m["epoch"] for m in members]},
        "history": [m["history"] for m in members],
        "members": [{s: binary_metrics(y[s], m["probs"][s]) for s in y} for m in members],
    }


def train_member(data_dir: Path, cfg: dict, seed: int, log: Callable) -> dict:
    """One model trained by the shipped loop (benchmarks/shipped_loop.py), the epoch best on
    ``train.primary_metric`` (validation) kept and scored on val and test."""
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.inference import predict

    trained = train_keeping_best(data_dir, cfg, seed, log)
    model, best, history = trained.model, trained.best, trained.history
    tcfg = cfg["train"]
    labels, probs = {}, {}
    for split in ("val", "test"):
        loader = DataLoader(
            FlexiModalDataset(data_dir, split),
            batch_size=2 * int(tcfg["batch_size"]),
            collate_fn=collate,
        )
        pred = predict(model, loader, torch.device("cpu"))
        labels[split] = pred["labels"][TASK].reshape(-1)
        probs[split] = 1 / (1 + np.exp(-pred["logits"][TASK].reshape(-1)))
    return {
        "epoch": best["epoch"],
        "labels": labels,
        "probs": probs,
        "history": history,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- report


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        runs = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seed"])
        agg = {"description": runs[0]["description"], "seeds": [r["seed"] for r in runs]}
        for split in ("val", "test"):
            for metric in ("auroc", "auprc"):
                vals = np.array([r[split][metric] for r in runs])
                agg[f"{split}_{metric}_mean"] = float(vals.mean())
                agg[f"{split}_{metric}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        agg["runs"] = runs
        out[name] = agg
    for name, agg in out.items():
        if CONFIGS[name].kind == "fusemoe":
            agg["paired"] = {
                ref: paired_difference(agg["runs"], out[ref]["runs"])
                for ref in PAIRED_REFERENCES
                if ref in out and ref != name
            }
    return out


# FuseMoE entries are compared split by split with these (gradient boosting, the no-MoE model).
PAIRED_REFERENCES = ("gbm", "dense")


def paired_difference(runs: list[dict], reference: list[dict]) -> dict:
    """Per-split differences (runs - reference) in test and val AUROC/AUPRC on their common
    seeds: the values, mean and a 95% Student-t interval over splits (none for one split)."""
    ref = {r["seed"]: r for r in reference}
    common = [r for r in runs if r["seed"] in ref]
    out: dict = {"seeds": [r["seed"] for r in common]}
    for split in ("test", "val"):
        for metric in ("auroc", "auprc"):
            d = np.array([r[split][metric] - ref[r["seed"]][split][metric] for r in common])
            entry = {"per_split": d.tolist(), "mean": float(d.mean()) if len(d) else None}
            if len(d) > 1:
                half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                entry["ci95"] = [float(d.mean() - half), float(d.mean() + half)]
            out[f"{split}_{metric}"] = entry
    return out


def markdown(summary: dict) -> str:
    lines = [
        "| model | test AUROC (%) | test AUPRC (%) | seeds |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} (ours) | {100 * s['test_auroc_mean']:.1f} ± {100 * s['test_auroc_std']:.1f} "
            f"| {100 * s['test_auprc_mean']:.1f} ± {100 * s['test_auprc_std']:.1f} | {len(s['seeds'])} |"
        )
    for name, (auroc, auprc) in PUBLISHED.items():
        lines.append(f"| {name} (published) | {auroc:.1f} | {auprc:.1f} | 5 |")
    lines += [
        "",
        "| paired test difference (points) | AUROC mean [95% CI] | AUPRC mean [95% CI] | seeds |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        for ref, d in s.get("paired", {}).items():
            cells = []
            for metric in ("auroc", "auprc"):
                e = d[f"test_{metric}"]
                ci = e.get("ci95")
                ci_text = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
                cells.append(f"{100 * e['mean']:+.1f}{ci_text}" if e["mean"] is not None else "")
            lines.append(f"| {name} − {ref} | {cells[0]} | {cells[1]} | {len(d['seeds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--epochs", type=int, default=None, help="FuseMoE epoch budget (default params.yaml)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=RESULTS / "p12_quality_runs.jsonl")
    ap.add_argument("--split-cache", type=Path, default=ROOT / "runs" / "p12_quality")
    ap.add_argument("--out", type=Path, default=RESULTS / "p12_quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    params = yaml.safe_load(args.params.read_text())
    # The train stage's settings, on this benchmark's task; the seed is the split's.
    train_params = params["train"] | {
        "tasks": [TASK],
        "primary_metric": f"val_auroc_{TASK}",
        "max_train_stays": 0,
    }
    for key in ("seed", "use_best_params", "run_name", "checkpoint_dir"):
        train_params.pop(key, None)
    if args.epochs is not None:
        train_params["epochs"] = args.epochs

    t0 = time.perf_counter()
    stays, events, manifest = read_flexi_frames(args.data)
    data_id = fingerprint(
        {"files": manifest.get("files", {}), "source_hashes": manifest["source_hashes"]}
    )
    y = labels(stays, manifest, TASK)
    splits = {s: assign_splits(stays, FRACTIONS, s, stratify_col=TASK) for s in args.seeds}
    features = None
    log(f"data: {len(stays)} stays, {len(events)} events ({time.perf_counter() - t0:.1f}s)")

    cache = read_cache(args.cache)
    done = {(r["config"], r["seed"], r["fingerprint"]) for r in cache}
    current = []
    for name in args.configs:
        entry = CONFIGS[name]
        # (an empty ``train`` is left out so older cached runs keep their fingerprint)
        described = {k: v for k, v in entry.__dict__.items() if k != "train" or v}
        settings = {"entry": described, "data": data_id, "fractions": FRACTIONS}
        if entry.kind == "fusemoe":
            settings |= {
                "loop": LOOP,
                "model": params["model"] | entry.model,
                "train": train_params | entry.train,
                "deepspeed": params["deepspeed"],
                "code": code_digest(),
            }
        fp = fingerprint(settings)
        current.append((name, fp))
        for seed in args.seeds:
            if (name, seed, fp) in done:
                log(f"{name} seed {seed}: cached")
                continue
            log(f"{name} seed {seed}: running")
            t1 = time.perf_counter()
            with threadpool_limits(args.threads):
                if entry.kind == "fusemoe":
                    data_dir = seed_dir(args.data, args.split_cache, seed, splits[seed])
                    res = run_fusemoe(entry, data_dir, settings, seed, log)
                else:
                    if features is None:
                        features = summary_features(stays, events, manifest).to_numpy()
                        log(f"summary features {features.shape} ({time.perf_counter() - t1:.1f}s)")
                    res = run_classical(entry, features, y, splits[seed], seed)
            row = {
                "config": name,
                "seed": seed,
                "fingerprint": fp,
                "description": entry.description,
                "settings": settings,
                **res,
                "wall_s": round(time.perf_counter() - t1, 1),
            }
            append_cache(args.cache, row)
            log(
                f"{name} seed {seed}: test AUROC {res['test']['auroc']:.4f} AUPRC {res['test']['auprc']:.4f} "
                f"(val AUROC {res['val']['auroc']:.4f}; {row['wall_s']}s)"
            )

    # Summary: this call's configs at their current settings; other configs of the cache at the
    # settings of their latest run (so separate calls for classical and FuseMoE entries add up).
    cache = read_cache(args.cache)
    wanted = {r["config"]: r["fingerprint"] for r in cache if r["config"] in CONFIGS} | dict(
        current
    )
    rows = [
        r
        for r in cache
        if wanted.get(r["config"]) == r["fingerprint"]
        and r["seed"] in args.seeds
        and (CONFIGS[r["config"]].kind != "fusemoe" or r["settings"].get("loop") == LOOP)
    ]
    rows.sort(key=lambda r: list(CONFIGS).index(r["config"]))
    summary = summarise(rows)
    report = {
        "benchmark": "p12_quality",
        "task": TASK,
        "protocol": f"{len(args.seeds)} seeds of stratified random {FRACTIONS} splits; selection on val only",
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
        },
        "data": {
            "dir": str(args.data),
            "stays": len(stays),
            "events": len(events),
            "source_hashes": manifest["source_hashes"],
        },
        "published": {k: {"auroc": a, "auprc": p} for k, (a, p) in PUBLISHED.items()},
        "configs": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(summary))
    log(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
