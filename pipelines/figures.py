"""PNG pictures of a run for MLflow and the README, drawn from the same tables as the DVC plots.

Every figure is written beside its target and renamed, so a reader never sees half an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def save_binary_curves(
    task: str, tables: dict[str, list[dict]], metrics: dict, out: Path
) -> list[Path]:
    """ROC, precision-recall and calibration curves of one binary task on test."""
    plt = _pyplot()
    test = metrics["test"]
    paths = []
    roc, pr, cal = (tables[f"{k}_{task}.json"] for k in ("roc", "pr", "calibration"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([r["fpr"] for r in roc], [r["tpr"] for r in roc], label=f"AUROC {test['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({task}, test)")
    ax.legend(loc="lower right")
    paths.append(out / f"roc_{task}.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(
        [r["recall"] for r in pr], [r["precision"] for r in pr], label=f"AUPRC {test['auprc']:.3f}"
    )
    ax.axhline(test["positive_rate"], ls="--", c="grey", lw=0.8, label="prevalence")
    ax.set(
        xlabel="recall", ylabel="precision", title=f"Precision-recall ({task}, test)", ylim=(0, 1)
    )
    ax.legend(loc="upper right")
    paths.append(out / f"pr_{task}.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(
        [r["predicted"] for r in cal],
        [r["observed"] for r in cal],
        marker="o",
        label=f"ECE {test['ece']:.3f}",
    )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed rate",
        title=f"Calibration ({task}, test)",
    )
    ax.legend(loc="upper left")
    paths.append(out / f"calibration_{task}.png")
    _save(fig, paths[-1])
    return paths


def save_confusion_matrix(task: str, rows: list[dict], out: Path) -> Path:
    """Test confusion matrix of one multiclass task, as row-normalised rates with counts."""
    plt = _pyplot()
    c = max(r["actual"] for r in rows) + 1
    counts = np.zeros((c, c))
    for r in rows:
        counts[r["actual"], r["predicted"]] = r["count"]
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * c, 1.2 + 0.7 * c))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for a in range(c):
        for b in range(c):
            ax.text(b, a, int(counts[a, b]), ha="center", va="center", fontsize=8)
    ax.set(
        xticks=range(c),
        yticks=range(c),
        xlabel="predicted class",
        ylabel="actual class",
        title=f"Confusion ({task}, test)",
    )
    fig.colorbar(im, ax=ax, fraction=0.05)
    path = out / f"confusion_{task}.png"
    _save(fig, path)
    return path


def save_label_scores(task: str, rows: list[dict], out: Path) -> Path:
    """Per-label test AUROC and AUPRC of one multilabel task (labels lacking a class left blank)."""
    plt = _pyplot()
    labels = [r["label"] for r in rows]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(2 + 0.4 * len(labels), 3.6))
    for shift, key in ((-0.2, "auroc"), (0.2, "auprc")):
        ax.bar(x + shift, [r.get(key, np.nan) for r in rows], width=0.4, label=key.upper())
    ax.set(xticks=x, xticklabels=labels, xlabel="label", ylim=(0, 1), title=f"{task} (test)")
    ax.legend()
    path = out / f"labels_{task}.png"
    _save(fig, path)
    return path


def save_missingness_sweep(sweeps: dict[str, list[dict]], out: Path) -> Path:
    """Every binary metric vs the fraction of modalities removed, one line per mechanism."""
    plt = _pyplot()
    prefixes = ("auroc_", "auprc_", "accuracy_", "macro_auroc_", "micro_auprc_")
    keys = [k for k in next(iter(sweeps.values()))[0] if k.startswith(prefixes)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for mechanism, rows in sweeps.items():
            ax.plot(
                [r["dropped_fraction"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                label=mechanism.upper(),
            )
        ax.set(xlabel="fraction of modalities removed (test)", ylabel=key, title=key)
        ax.legend()
    path = out / "missingness_sweep.png"
    _save(fig, path)
    return path


def save_training_curves(history: list[dict], primary: str, out: Path) -> list[Path]:
    """Training loss and the validation metric per epoch; router entropy per epoch."""
    if not history:
        return []
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.set(xlabel="epoch", ylabel="train loss", title="Training curves")
    if primary in history[0]:
        twin = ax.twinx()
        twin.plot(epochs, [h[primary] for h in history], marker="s", c="tab:orange", label=primary)
        twin.set_ylabel(primary)
        twin.legend(loc="lower right")
    ax.legend(loc="upper right")
    paths = [out / "training_curves.png"]
    _save(fig, paths[0])
    if "routing_router_entropy" in history[0]:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(epochs, [h["routing_router_entropy"] for h in history], marker="o")
        ax.set(
            xlabel="epoch",
            ylabel="mean router entropy (nats)",
            title="Router entropy over training",
        )
        paths.append(out / "router_entropy.png")
        _save(fig, paths[-1])
    return paths


def save_usage_heatmap(rows: list[dict], path: Path) -> None:
    """Expert usage per modality on the test set."""
    plt = _pyplot()
    mods = list(dict.fromkeys(r["modality"] for r in rows))
    n_exp = max(r["expert"] for r in rows) + 1
    grid = np.zeros((len(mods), n_exp))
    for r in rows:
        grid[mods.index(r["modality"]), r["expert"]] = r["fraction"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_exp, 1 + 0.6 * len(mods)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set(
        xticks=range(n_exp),
        yticks=range(len(mods)),
        yticklabels=mods,
        xlabel="expert",
        title="Expert usage per modality (test)",
    )
    fig.colorbar(im, ax=ax, fraction=0.05)
    _save(fig, path)
