"""DVC stage `evaluate`: honest held-out metrics for the model the train stage chose on validation.

Thresholds are picked on validation and applied to test. Writes metrics.json (DVC metrics), plot
data under plots/ (DVC plots) and logs everything to the train stage's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusemoe.data.dataset import FlexiModalDataset, collate
from fusemoe.metrics import (
    best_f1_threshold,
    binary_metrics,
    bootstrap_ci,
    calibration_curve,
    regression_metrics,
)
from fusemoe.train import load_model, output_to_prediction, predict
from pipelines.common import (
    TRAIN_DIR,
    load_params,
    read_run,
    stage_args,
    tracking_uri,
    write_json_atomic,
)

METRICS_FILE = Path("metrics.json")
PLOTS = Path("plots")
SWEEP = (0.0, 0.2, 0.4, 0.6, 0.8)


def drop_modalities(fraction: float, seed: int):
    """A batch transform removing each present modality with probability `fraction` (MCAR)."""
    gen = torch.Generator().manual_seed(seed)

    def transform(batch: dict) -> dict:
        present = {}
        for m, flags in batch["present"].items():
            keep = torch.rand(flags.shape, generator=gen) >= fraction
            present[m] = flags & keep.to(flags.device)
        return {**batch, "present": present}

    return transform


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
        f"pr_{task}.json": [{"recall": float(a), "precision": float(b)} for a, b in _thin(rec, prec)],
        f"calibration_{task}.json": calibration_curve(yt[keep], pt[keep]),
    }
    return out, plots


def _thin(x: np.ndarray, y: np.ndarray, n: int = 200):
    idx = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))
    return zip(x[idx], y[idx], strict=True)


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
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
    seed = int(params["train"]["seed"])

    metrics: dict = {"best_epoch": run["best_epoch"], "mlflow_run_id": run["mlflow_run_id"]}
    plots: dict = {}
    flat: dict[str, float] = {}
    for task in spec.tasks:
        if task.kind == "binary":
            report, task_plots = binary_report(task.name, val, test, seed)
            plots.update(task_plots)
            for split in ("val", "test"):
                for k in ("auroc", "auprc", "f1", "brier", "ece"):
                    flat[f"{split}_{k}_{task.name}"] = report[split][k]
        elif task.kind == "regression":
            report = {
                split: regression_metrics(d["labels"][task.name].reshape(-1),
                                          output_to_prediction("regression", d["logits"][task.name]))
                for split, d in (("val", val), ("test", test))
            }
            for split in ("val", "test"):
                for k in ("mae", "rmse"):
                    flat[f"{split}_{k}_{task.name}"] = report[split][k]
        else:
            continue
        metrics[task.name] = report

    # Robustness: metric vs fraction of modalities removed at test time (missing completely at random).
    sweep = []
    for frac in SWEEP:
        pred = predict(model, loaders["test"], device, drop_modalities(frac, seed))
        row = {"dropped_fraction": frac}
        for task in spec.tasks:
            if task.kind == "binary":
                m = binary_metrics(pred["labels"][task.name].reshape(-1),
                                   output_to_prediction("binary", pred["logits"][task.name]))
                row[f"auroc_{task.name}"] = m["auroc"]
                row[f"auprc_{task.name}"] = m["auprc"]
        sweep.append(row)
    metrics["missingness_sweep"] = sweep
    plots["missingness_sweep.json"] = sweep

    for name, rows in plots.items():
        write_json_atomic(PLOTS / name, rows)
    write_json_atomic(METRICS_FILE, metrics)
    _log_to_mlflow(params, run["mlflow_run_id"], flat, metrics)
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if k.startswith("test_")))


def _log_to_mlflow(params: dict, run_id: str, flat: dict[str, float], metrics: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    client = mlflow.MlflowClient()
    # Prefixed so they never collide with the per-epoch val_* curves logged during training.
    for k, v in flat.items():
        client.log_metric(run_id, f"eval_{k}", float(v))
    client.log_dict(run_id, metrics, "evaluation/metrics.json")
    for f in sorted(PLOTS.glob("*.json")):
        client.log_artifact(run_id, str(f), "evaluation/plots")


if __name__ == "__main__":
    main()
