"""Scoring a trained FuseMoE: batched prediction and the user-facing outputs of each task kind."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusemoe.data.dataset import DataSpec, batch_to
from fusemoe.metrics import output_to_prediction


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    transform: Callable[[dict], dict] | None = None,
) -> dict:
    """Scores every sample of `loader`; returns stay ids, per-task outputs, labels and which
    modalities each sample had, as numpy. `transform` may edit a batch first (e.g. drop modalities).
    """
    model.eval()
    outs: dict[str, list] = {}
    labels: dict[str, list] = {}
    present: dict[str, list] = {}
    stay_ids: list[str] = []
    usage, n_seen = None, 0
    for batch in loader:
        batch = batch_to(batch, device)
        if transform is not None:
            batch = transform(batch)
        out = model(batch)
        if "expert_usage" in out.routing:  # [modalities, experts], averaged over samples
            b = len(batch["stay_id"])
            u = out.routing["expert_usage"].float().cpu() * b
            usage = u if usage is None else usage + u
            n_seen += b
        for m, flags in batch["present"].items():
            present.setdefault(m, []).append(flags.cpu())
        for task, logits in out.logits.items():
            outs.setdefault(task, []).append(logits.float().cpu())
            labels.setdefault(task, []).append(batch["labels"][task].float().cpu())
        stay_ids.extend(batch["stay_id"])
    return {
        "stay_id": stay_ids,
        "logits": {t: torch.cat(v).numpy() for t, v in outs.items()},
        "labels": {t: torch.cat(v).numpy() for t, v in labels.items()},
        "present": {m: torch.cat(v).numpy().astype(bool) for m, v in present.items()},
        "expert_usage": None if usage is None else (usage / n_seen).numpy(),
    }


def merge_predictions(parts: list[dict]) -> dict:
    """One ``predict`` result from those of disjoint shards (e.g. each rank's part of the
    validation split), in the order given; expert usage is averaged over all their samples."""
    parts = [p for p in parts if p["stay_id"]]  # a rank may have had no stays
    if not parts:
        raise ValueError("no predictions to merge: every part is empty")
    merged: dict = {"stay_id": [s for p in parts for s in p["stay_id"]]}
    for key in ("logits", "labels", "present"):
        merged[key] = {k: np.concatenate([p[key][k] for p in parts]) for k in parts[0][key]}
    if parts[0]["expert_usage"] is None:
        merged["expert_usage"] = None
    else:
        counts = [len(p["stay_id"]) for p in parts]
        usage = sum(p["expert_usage"] * n for p, n in zip(parts, counts, strict=True))
        merged["expert_usage"] = usage / sum(counts)
    return merged


class NonFinitePrediction(ValueError):
    """A model output that is NaN or infinite (e.g. from an extreme input value): never written."""


def predictions_table(pred: dict, spec: DataSpec):
    """One row per stay: prob_<task> (binary), <task> (regression), prob_<task>_<k> per class and
    pred_<task> (multiclass: the most probable class), prob_<task>_<k> per label (multilabel).

    Every output must be finite, so no prediction file or pyfunc answer ever holds a NaN: a
    non-finite one raises NonFinitePrediction naming the stay."""
    import pandas as pd

    columns: dict[str, np.ndarray] = {"stay_id": np.asarray(pred["stay_id"], dtype=object)}
    for task in spec.tasks:
        out = output_to_prediction(task.kind, pred["logits"][task.name])
        if task.kind == "binary":
            columns[f"prob_{task.name}"] = out.reshape(-1)
        elif task.kind == "regression":
            columns[task.name] = out.reshape(-1)
        else:
            out = out.reshape(len(columns["stay_id"]), -1)
            columns.update({f"prob_{task.name}_{k}": out[:, k] for k in range(out.shape[1])})
            if task.kind == "multiclass":
                columns[f"pred_{task.name}"] = out.argmax(1).astype(np.int16)
    for name, values in columns.items():
        bad = ~np.isfinite(values) if name != "stay_id" else np.zeros(len(values), bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NonFinitePrediction(
                f"stay '{columns['stay_id'][i]}': prediction {name} is {values[i]} "
                f"({int(bad.sum())} stay(s) affected); check its input values for extremes"
            )
    return pd.DataFrame(columns)
