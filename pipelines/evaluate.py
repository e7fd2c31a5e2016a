"""DVC stage `evaluate`: honest held-out metrics for the model the train stage chose on validation.

Thresholds are picked on validation and applied to test. Writes metrics.json (DVC metrics), plot
data under plots/ (DVC plots) and logs everything to the train stage's MLflow run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusemoe.data.dataset import FlexiModalDataset, collate, drop_modalities
from fusemoe.inference import NonFinitePrediction, predict, predictions_table
from fusemoe.metrics import (
    KIND_METRICS,
    best_f1_threshold,
    binary_metrics,
    bootstrap_ci,
    calibration_curve,
    multilabel_metrics,
    output_to_prediction,
    task_kind_metrics,
)
from fusemoe.model_io import load_model
from pipelines.common import (
    HISTORY_FILE,
    TRAIN_DIR,
    load_params,
    read_run,
    replace_dir,
    skip_final_gc,
    stage_args,
    tracking_uri,
    write_json_atomic,
)
from pipelines.figures import (
    save_binary_curves,
    save_confusion_matrix,
    save_label_scores,
    save_missingness_sweep,
    save_training_curves,
    save_usage_heatmap,
)

METRICS_FILE = Path("metrics.json")
PREDICTIONS_FILE = Path("metrics/test_predictions.parquet")
PLOTS = Path("plots")
SWEEP = (0.0, 0.2, 0.4, 0.6, 0.8)
# Per task kind, the metrics followed along the missingness sweep (row keys <metric>_<task>).
SWEEP_METRICS = {
    "binary": ("auroc", "auprc"),
    "regression": ("mae",),
    "multiclass": ("accuracy", "macro_auroc"),
    "multilabel": ("macro_auroc", "micro_auprc"),
}


def at_random(fraction: float, seed: int):
    """Missing completely at random: a batch transform removing each present modality of each
    sample with probability `fraction`."""
    gen = torch.Generator().manual_seed(seed)
    return lambda batch: drop_modalities(batch, fraction, gen)


def observation_counts(ds: FlexiModalDataset) -> dict[str, np.ndarray]:
    """Per modality, how many values each stay of `ds` has (static: observed descriptors;
    embedding modalities: vectors)."""
    counts = {name: np.diff(s.obs_offsets) for name, s in ds.series.items()}
    counts |= {name: np.diff(e.offsets) for name, e in ds.embeddings.items()}  # vectors
    if ds.static_name is not None:
        counts[ds.static_name] = ds.static_mask.sum(1)
    return counts


def drop_least_observed(fraction: float, ds: FlexiModalDataset, seed: int):
    """Missing not at random: in every modality, the `fraction` of the stays having it that have
    the fewest observations of it lose it (ties broken at random). Whether a modality is missing
    then depends on what it would have shown: sparsely monitored stays (on P12, mostly the
    healthier ones) go first, as when a test is not ordered for a stable patient."""
    rng = np.random.default_rng(seed)
    row = {sid: i for i, sid in enumerate(ds.stay_ids)}
    dropped = {}
    for m, counts in observation_counts(ds).items():
        having = np.flatnonzero(counts > 0)
        order = having[np.lexsort((rng.random(len(having)), counts[having]))]
        flags = np.zeros(len(counts), bool)
        flags[order[: int(round(fraction * len(having)))]] = True
        dropped[m] = flags

    def transform(batch: dict) -> dict:
        rows = [row[s] for s in batch["stay_id"]]
        present = {
            m: flags & torch.from_numpy(~dropped[m][rows]).to(flags.device)
            for m, flags in batch["present"].items()
        }
        return {**batch, "present": present}

    return transform


def missingness_sweep(model, loader: DataLoader, spec, mechanism) -> list[dict]:
    """Test metrics with a growing fraction of modalities removed; `mechanism(f)` makes the
    batch transform removing fraction f."""
    rows = []
    for frac in SWEEP:
        pred = predict(model, loader, torch.device("cpu"), mechanism(frac))
        row = {"dropped_fraction": frac}
        for task in spec.tasks:
            yhat = output_to_prediction(task.kind, pred["logits"][task.name])
            m = task_kind_metrics(task.kind, pred["labels"][task.name], yhat)
            row.update({f"{k}_{task.name}": m[k] for k in SWEEP_METRICS[task.kind]})
        rows.append(row)
    return rows


def pattern_names(present: dict[str, np.ndarray]) -> np.ndarray:
    """Each sample's set of present modalities as a readable key, e.g. 'labs+static+vitals'."""
    names = sorted(present)
    n = len(next(iter(present.values())))
    return np.array(["+".join(m for m in names if present[m][i]) or "none" for i in range(n)])


def binary_report(task: str, val: dict, test: dict, seed: int) -> tuple[dict, dict]:
    """Metrics dict for metrics.json and plot tables for one binary task."""
    pv = output_to_prediction("binary", val["logits"][task])
    pt = output_to_prediction("binary", test["logits"][task])
    yv, yt = val["labels"][task].reshape(-1), test["labels"][task].reshape(-1)
    threshold = best_f1_threshold(yv[~np.isnan(yv)], pv[~np.isnan(yv)])
    out = {
        "val": binary_metrics(yv, pv, threshold),
        "test": binary_metrics(yt, pt, threshold),
        "threshold": threshold,
        "test_ci95": bootstrap_ci(yt, pt, ("auroc", "auprc", "brier"), seed=seed),
    }
    by_pattern = {}
    patterns = pattern_names(test["present"])
    for pat in np.unique(patterns):
        sel = patterns == pat
        ys = yt[sel]
        ys = ys[~np.isnan(ys)]
        if sel.sum() >= 30 and 0 < ys.sum() < len(ys):
            m = binary_metrics(yt[sel], pt[sel], threshold)
            by_pattern[pat] = {"n": m["n"], "auroc": m["auroc"], "auprc": m["auprc"]}
        else:
            by_pattern[pat] = {"n": int(sel.sum())}
    out["test_by_modality_pattern"] = by_pattern
    keep = ~np.isnan(yt)
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(yt[keep].astype(int), pt[keep])
    prec, rec, _ = precision_recall_curve(yt[keep].astype(int), pt[keep])
    plots = {
        f"roc_{task}.json": [{"fpr": float(a), "tpr": float(b)} for a, b in _thin(fpr, tpr)],
        f"pr_{task}.json": [
            {"recall": float(a), "precision": float(b)} for a, b in _thin(rec, prec)
        ],
        f"calibration_{task}.json": calibration_curve(yt[keep], pt[keep]),
    }
    return out, plots


def class_report(task, val: dict, test: dict) -> tuple[dict, dict]:
    """Metrics dict and plot tables for one multiclass or multilabel task: the test confusion
    matrix (multiclass) or per-label test AUROC/AUPRC (multilabel)."""
    name, kind = task.name, task.kind
    probs = {
        s: output_to_prediction(kind, d["logits"][name]) for s, d in (("val", val), ("test", test))
    }
    out = {
        s: task_kind_metrics(kind, d["labels"][name], probs[s])
        for s, d in (("val", val), ("test", test))
    }
    y, p = test["labels"][name], probs["test"]
    if kind == "multiclass":
        keep = ~np.isnan(y)
        actual, predicted = y[keep].astype(int), p[keep].argmax(1)
        table = [
            {"actual": a, "predicted": b, "count": int(((actual == a) & (predicted == b)).sum())}
            for a in range(task.num_outputs)
            for b in range(task.num_outputs)
        ]
        return out, {f"confusion_{name}.json": table}
    table = []
    for k in range(task.num_outputs):
        seen = ~np.isnan(y[:, k])
        row = {"label": k, "n": int(seen.sum()), "positive_rate": float(y[seen, k].mean())}
        try:
            m = multilabel_metrics(y[seen, k : k + 1], p[seen, k : k + 1])
            row.update(auroc=m["macro_auroc"], auprc=m["macro_auprc"])
        except ValueError:  # this label lacks a class on test: no curve, only its count
            pass
        table.append(row)
    return out, {f"labels_{name}.json": table}


def _thin(x: np.ndarray, y: np.ndarray, n: int = 200):
    idx = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))
    return zip(x[idx], y[idx], strict=True)


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
    skip_final_gc()
    params = load_params(args.params, ("data", "train", "mlflow"))
    run = read_run()
    model, spec = load_model(TRAIN_DIR)
    data_dir = Path(params["data"]["out_dir"])
    bs = int(params["train"]["batch_size"]) * 2
    loaders = {
        split: DataLoader(FlexiModalDataset(data_dir, split), batch_size=bs, collate_fn=collate)
        for split in ("val", "test")
    }
    device = torch.device("cpu")
    val = predict(model, loaders["val"], device)
    test = predict(model, loaders["test"], device)
    tables = {}
    for split, pred in (("val", val), ("test", test)):
        try:  # refuses a non-finite output before any metric or file is computed from it
            tables[split] = predictions_table(pred, spec)
        except NonFinitePrediction as e:
            sys.exit(f"error: evaluate, {split} split: {e}")
    seed = int(params["train"]["seed"])

    metrics: dict = {"best_epoch": run["best_epoch"], "mlflow_run_id": run["mlflow_run_id"]}
    plots: dict = {}
    flat: dict[str, float] = {}
    for task in spec.tasks:
        if task.kind == "binary":
            report, task_plots = binary_report(task.name, val, test, seed)
            keys: tuple[str, ...] = ("auroc", "auprc", "f1", "brier", "ece")
        elif task.kind == "regression":
            report = {
                split: task_kind_metrics(
                    "regression",
                    d["labels"][task.name],
                    output_to_prediction("regression", d["logits"][task.name]),
                )
                for split, d in (("val", val), ("test", test))
            }
            task_plots, keys = {}, KIND_METRICS["regression"][1]
        else:
            report, task_plots = class_report(task, val, test)
            keys = KIND_METRICS[task.kind][1]
        plots.update(task_plots)
        for split in ("val", "test"):
            for k in keys:
                flat[f"{split}_{k}_{task.name}"] = report[split][k]
        metrics[task.name] = report

    # Robustness: metrics vs fraction of modalities removed at test time, at random and not.
    sweeps = {
        "mcar": missingness_sweep(model, loaders["test"], spec, lambda f: at_random(f, seed)),
        "mnar": missingness_sweep(
            model,
            loaders["test"],
            spec,
            lambda f: drop_least_observed(f, loaders["test"].dataset, seed),
        ),
    }
    metrics["missingness_sweep"] = sweeps
    for mechanism, rows in sweeps.items():
        plots[f"missingness_sweep_{mechanism}.json"] = rows
    if test["expert_usage"] is not None:
        plots["expert_usage.json"] = [
            {"modality": m, "expert": e, "fraction": float(test["expert_usage"][i, e])}
            for i, m in enumerate(routing_rows(spec))
            for e in range(test["expert_usage"].shape[1])
        ]

    write_plots(plots, sweeps, metrics, spec, params["train"]["primary_metric"])
    write_predictions(tables["test"])
    write_json_atomic(METRICS_FILE, metrics)
    _log_to_mlflow(params, run["mlflow_run_id"], flat, metrics)
    print(
        "evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if k.startswith("test_"))
    )


def routing_rows(spec) -> list[str]:
    """Row names of the model's expert-usage matrix: series, embedding modalities, then static."""
    rows = list(spec.series) + list(getattr(spec, "embeddings", None) or {})
    if spec.static_dim:
        rows.append(spec.static_name or "static")
    return rows


def write_plots(plots: dict, sweeps: dict, metrics: dict, spec, primary: str) -> None:
    """Plot tables (DVC plots) and their pictures (MLflow, README) into a fresh plots/ directory,
    swapped in whole so no stale or half-written plot survives."""
    staging = Path(tempfile.mkdtemp(prefix=".plots-", dir=PLOTS.parent)) / "plots"
    for name, rows in plots.items():
        write_json_atomic(staging / name, rows)
    if "expert_usage.json" in plots:
        save_usage_heatmap(plots["expert_usage.json"], staging / "expert_usage.png")
    for task in spec.tasks:
        if task.kind == "binary":
            save_binary_curves(task.name, plots, metrics[task.name], staging)
        elif task.kind == "multiclass":
            save_confusion_matrix(task.name, plots[f"confusion_{task.name}.json"], staging)
        elif task.kind == "multilabel":
            save_label_scores(task.name, plots[f"labels_{task.name}.json"], staging)
    save_missingness_sweep(sweeps, staging)
    history = json.loads(HISTORY_FILE.read_text()) if HISTORY_FILE.is_file() else []
    save_training_curves(history, primary, staging)
    replace_dir(staging, PLOTS)
    shutil.rmtree(staging.parent, ignore_errors=True)


def write_predictions(table) -> None:
    """Per-stay test predictions (all finite), the reference the packaged model must reproduce."""
    PREDICTIONS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = PREDICTIONS_FILE.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(PREDICTIONS_FILE)


def _log_to_mlflow(params: dict, run_id: str, flat: dict[str, float], metrics: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    client = mlflow.MlflowClient()
    # Prefixed so they never collide with the per-epoch val_* curves logged during training.
    for k, v in flat.items():
        client.log_metric(run_id, f"eval_{k}", float(v))
    client.log_dict(run_id, metrics, "evaluation/metrics.json")
    for f in sorted([*PLOTS.glob("*.json"), *PLOTS.glob("*.png")]):  # tables and pictures
        client.log_artifact(run_id, str(f), "evaluation/plots")


if __name__ == "__main__":
    main()
