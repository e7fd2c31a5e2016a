"""Evaluation metrics: discrimination, calibration, thresholded scores, bootstrap intervals.

Pure numpy + scikit-learn so the evaluate stage, the Ray workers and the benchmarks compute metrics
the same way. Thresholds are always chosen on validation and applied unchanged to test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

if TYPE_CHECKING:
    from fusemoe.data.dataset import DataSpec


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum_b |B|/n * |mean(y_b) - mean(p_b)|."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def calibration_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict]:
    """Per-bin mean prediction vs observed rate (bins with no samples are left out)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    return [
        {
            "predicted": float(p[which == b].mean()),
            "observed": float(y[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold maximising F1 (chosen on validation only)."""
    candidates = np.unique(np.quantile(p, np.linspace(0.01, 0.99, 99)))
    scores = [f1_score(y, p >= t, zero_division=0) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC, F1 at `threshold`, Brier score and ECE; NaN labels are dropped."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y)
    y, p = y[keep].astype(int), p[keep]
    if len(np.unique(y)) < 2:
        raise ValueError(f"binary metrics need both classes; got {len(y)} labels of one class")
    return {
        "auroc": float(roc_auc_score(y, p)),
        "auprc": float(average_precision_score(y, p)),
        "f1": float(f1_score(y, p >= threshold, zero_division=0)),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "n": int(len(y)),
        "positive_rate": float(y.mean()),
    }


def regression_metrics(y: np.ndarray, yhat: np.ndarray) -> dict[str, float]:
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    keep = ~np.isnan(y)
    y, yhat = y[keep], yhat[keep]
    return {
        "mae": float(mean_absolute_error(y, yhat)),
        "rmse": float(np.sqrt(mean_squared_error(y, yhat))),
        "n": int(len(y)),
    }


def _auroc_auprc(y: np.ndarray, p: np.ndarray) -> tuple[float, float] | None:
    """(AUROC, AUPRC) of one binary column, or None when it lacks one of the classes."""
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def multiclass_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and macro one-vs-rest AUROC; y class indices [N] (NaN = unlabelled),
    p class probabilities [N, C]. The macro AUROC averages the classes that occur in ``y`` and are
    not all of it (a class with no positives has no ROC curve); macro-F1 averages all C classes."""
    y, p = np.asarray(y, float).reshape(-1), np.asarray(p, float)
    keep = ~np.isnan(y)
    y, p = y[keep].astype(int), p[keep]
    c = p.shape[1]
    aurocs = [r[0] for k in range(c) if (r := _auroc_auprc(y == k, p[:, k])) is not None]
    if not aurocs:
        raise ValueError(f"multiclass metrics need at least two classes; got {len(y)} labels")
    pred = p.argmax(1)
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, labels=range(c), average="macro", zero_division=0)),
        "macro_auroc": float(np.mean(aurocs)),
        "n": int(len(y)),
    }


def multilabel_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Macro and micro AUROC and AUPRC; y [N, C] in {0, 1} with NaN for unobserved labels,
    p [N, C] probabilities. Macro averages the labels having both classes (as for 25-label
    phenotyping, where rare phenotypes may lack positives in a split); micro pools every observed
    (sample, label) pair into one binary problem."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    seen = ~np.isnan(y)
    per_label = [
        r for k in range(y.shape[1]) if (r := _auroc_auprc(y[seen[:, k], k], p[seen[:, k], k]))
    ]
    micro = _auroc_auprc(y[seen], p[seen])
    if not per_label or micro is None:
        raise ValueError("multilabel metrics need a label with both classes")
    return {
        "macro_auroc": float(np.mean([r[0] for r in per_label])),
        "micro_auroc": micro[0],
        "macro_auprc": float(np.mean([r[1] for r in per_label])),
        "micro_auprc": micro[1],
        "n": int(seen.any(1).sum()),
    }


# Per task kind: the metric function and the keys logged as <split>_<key>_<task> (what
# train.primary_metric and registry.metric may name).
KIND_METRICS = {
    "binary": (binary_metrics, ("auroc", "auprc", "brier", "ece")),
    "regression": (regression_metrics, ("mae", "rmse")),
    "multiclass": (multiclass_metrics, ("accuracy", "macro_f1", "macro_auroc")),
    "multilabel": (
        multilabel_metrics,
        ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc"),
    ),
}


def task_kind_metrics(kind: str, y: np.ndarray, yhat: np.ndarray) -> dict[str, float]:
    """The metrics of one task of ``kind`` from labels and predictions (probabilities/values)."""
    fn, _ = KIND_METRICS[kind]
    if kind in ("binary", "regression"):
        return fn(np.asarray(y).reshape(-1), np.asarray(yhat).reshape(-1))
    return fn(y, yhat)


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    metric_names: tuple[str, ...] = ("auroc", "auprc"),
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over samples (resamples lacking a class are skipped)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y)
    y, p = y[keep].astype(int), p[keep]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in metric_names}
    fns = {"auroc": roc_auc_score, "auprc": average_precision_score, "brier": brier_score_loss}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        for m in metric_names:
            draws[m].append(float(fns[m](y[idx], p[idx])))
    return {
        m: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))
        for m, v in draws.items()
        if v
    }


# The one definition of "better". Every consumer (checkpoint scoring, Tune's mode, the best-trial
# choice, registry promotion) asks `higher_is_better`; nothing infers a direction on its own.
HIGHER_IS_BETTER = (
    "auroc", "auprc", "f1", "accuracy", "macro_f1", "macro_auroc", "micro_auroc",
    "macro_auprc", "micro_auprc", "r2",
)  # fmt: skip
LOWER_IS_BETTER = ("loss", "brier", "ece", "mae", "rmse")
_SPLIT_PREFIXES = ("eval_", "val_", "test_", "train_")


def higher_is_better(metric: str) -> bool:
    """Direction of a logged metric key such as ``val_auroc_ihm``, ``eval_val_mae_los_days`` or
    ``val_loss``: the split prefixes are stripped and the longest known metric name that starts
    the rest decides. An unknown metric is an error, never a guess."""
    rest = metric
    while rest.startswith(_SPLIT_PREFIXES):
        rest = rest.split("_", 1)[1]
    matches = [
        (name, up)
        for names, up in ((HIGHER_IS_BETTER, True), (LOWER_IS_BETTER, False))
        for name in names
        if rest == name or rest.startswith(name + "_")
    ]
    if not matches:
        known = ", ".join(sorted(HIGHER_IS_BETTER + LOWER_IS_BETTER))
        raise ValueError(
            f"metric '{metric}': unknown direction; its name must contain one of {known}"
        )
    return max(matches, key=lambda m: len(m[0]))[1]


def metric_mode(metric: str) -> str:
    """``"max"`` or ``"min"``, as Ray Train and Ray Tune spell the direction."""
    return "max" if higher_is_better(metric) else "min"


def is_better(candidate: float, reference: float, metric: str, margin: float = 0.0) -> bool:
    """True when ``candidate`` beats ``reference`` on ``metric`` by more than ``margin``."""
    if higher_is_better(metric):
        return candidate > reference + margin
    return candidate < reference - margin


def best_index(scores: Sequence[float | None], metric: str) -> int:
    """Position of the best of ``scores`` on ``metric`` (the first on a tie), for choosing an
    epoch, a checkpoint or a trial. A missing or NaN score never wins; none at all is an error."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    scored = [(sign * float(s), -i) for i, s in enumerate(scores) if s is not None and s == s]
    if not scored:
        raise ValueError(f"no {metric} among {len(scores)} score(s) to choose the best from")
    return -max(scored)[1]


def output_to_prediction(kind: str, logits: np.ndarray) -> np.ndarray:
    """Turns raw head outputs into what users consume: probabilities or regression values."""
    if kind in ("binary", "multilabel"):
        p = 1.0 / (1.0 + np.exp(-logits))
        return p[:, 0] if kind == "binary" and p.ndim == 2 else p
    if kind == "multiclass":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return logits[:, 0] if logits.ndim == 2 else logits


def task_metrics(pred: dict, spec: DataSpec, prefix: str) -> dict[str, float]:
    """Flat metric dict (e.g. val_auroc_ihm, val_macro_auroc_activity) for every task."""
    metrics: dict[str, float] = {}
    for task in spec.tasks:
        yhat = output_to_prediction(task.kind, pred["logits"][task.name])
        m = task_kind_metrics(task.kind, pred["labels"][task.name], yhat)
        keys = KIND_METRICS[task.kind][1]
        metrics.update({f"{prefix}_{k}_{task.name}": m[k] for k in keys})
    return metrics
