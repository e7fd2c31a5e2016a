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
from fusemoe.train import load_model, output_to_prediction, predict, predictions_table
from pipelines.common import (
    TRAIN_DIR,
    load_params,
    read_run,
    stage_args,
    tracking_uri,
    write_json_atomic,
)

METRICS_FILE = Path("metrics.json")
PREDICTIONS_FILE = Path("metrics/test_predictions.parquet")
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
    if test["expert_usage"] is not None:
        plots["expert_usage.json"] = [
            {"modality": m, "expert": e, "fraction": float(test["expert_usage"][i, e])}
            for i, m in enumerate(routing_rows(spec))
            for e in range(test["expert_usage"].shape[1])
        ]

    for name, rows in plots.items():
        write_json_atomic(PLOTS / name, rows)
    write_predictions(test, spec)
    if "expert_usage.json" in plots:
        save_usage_heatmap(plots["expert_usage.json"], PLOTS / "expert_usage.png")
    write_json_atomic(METRICS_FILE, metrics)
    _log_to_mlflow(params, run["mlflow_run_id"], flat, metrics)
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if k.startswith("test_")))


def routing_rows(spec) -> list[str]:
    """Row names of the model's expert-usage matrix: series modalities, then static."""
    rows = list(spec.series)
    if spec.static_dim:
        rows.append(spec.static_name or "static")
    return rows


def save_usage_heatmap(rows: list[dict], path: Path) -> None:
    """Expert usage per modality on the test set, as a picture for MLflow and the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = list(dict.fromkeys(r["modality"] for r in rows))
    n_exp = max(r["expert"] for r in rows) + 1
    grid = np.zeros((len(mods), n_exp))
    for r in rows:
        grid[mods.index(r["modality"]), r["expert"]] = r["fraction"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_exp, 1 + 0.6 * len(mods)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set(xticks=range(n_exp), yticks=range(len(mods)), yticklabels=mods, xlabel="expert",
           title="Expert usage per modality (test)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_predictions(pred: dict, spec) -> None:
    """Per-stay test predictions, the reference the packaged model must reproduce."""
    table = predictions_table(pred, spec)
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
    for f in sorted([*PLOTS.glob("*.json"), *PLOTS.glob("*.png")]):
        client.log_artifact(run_id, str(f), "evaluation/plots")


if __name__ == "__main__":
    main()
