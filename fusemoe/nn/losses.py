"""Losses: task loss over several heads, MoE load balance, and FuseMoE's entropy regularizer.

Load balance (Switch Transformer style, Fedus et al. 2021): ``E * sum_e f_e * P_e`` with ``f_e``
the fraction of the router's token-expert assignments (all K slots) that went to expert e and
``P_e`` the mean router probability of e. It equals 1 under perfectly uniform routing and grows as
routing concentrates; only ``P_e`` carries gradient (``f_e`` is a count). 1 is not a lower
bound: with top-K > 1 the K slots spread ``f`` more evenly than ``P``, so values under 1 occur.
We prefer it to the importance CV^2 because it is scale-free in E and K and is what
DeepSpeed/Switch report.
The MoE layer applies it to all tokens an expert set receives, pooled over the routers that share
it (``fusemoe.nn.moe``): balancing each per-modality router on its own would fight the entropy
regularizer below.

Entropy regularizer (FuseMoE, arXiv 2402.03226, per-modality routers):
``L_ent = (1/M) sum_j H(p_j) - H((1/M) sum_j p_j)``.
Our reading: ``p_j`` is router j's *average* routing distribution over the tokens of modality j
(an estimate of P(expert | modality j)), not a per-token distribution. With a uniform prior over
modalities, ``(1/M) sum_j H(p_j) = H(expert | modality)`` and ``H((1/M) sum_j p_j) = H(expert)``,
so ``L_ent = -I(modality; expert)``. By concavity of entropy ``L_ent <= 0``: it is 0 exactly when
all modalities route alike, negative when they differ, and *minimizing* it (adding it to the loss
with a positive weight) drives each modality to a confident, modality-specific set of experts
while keeping the experts used overall spread out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-9


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of distributions along ``dim``; 0 log 0 = 0."""
    p = p.float()
    return -(p * (p + _EPS).log()).sum(dim)


def load_balance_loss(probs: Tensor, topk_idx: Tensor) -> Tensor:
    """Switch-style balance ``E * sum_e f_e P_e`` for one router: probs [N, E], topk_idx [N, K]."""
    num_experts = probs.shape[-1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), device=probs.device))
    fraction = counts / topk_idx.numel()
    return num_experts * (fraction * probs.float().mean(0)).sum()


def entropy_regularizer(modality_probs: Tensor) -> Tensor:
    """FuseMoE's ``(1/M) sum_j H(p_j) - H(mean_j p_j)`` for modality_probs [M, E] (rows = p_j).

    Equals ``-I(modality; expert)``: 0 when all p_j are identical, negative otherwise.
    """
    p = modality_probs.float()
    return entropy(p).mean() - entropy(p.mean(0))


def _task_kind(task: object) -> tuple[str, str]:
    """(name, kind) of a TaskSpec-like object or a (name, kind) pair."""
    if isinstance(task, tuple):
        return task[0], task[1]
    return task.name, task.kind  # type: ignore[attr-defined]


def task_loss(
    logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    tasks: Sequence[object],
    weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Mean over tasks of each task's loss, weighted by ``weights`` (task name -> weight, 1 for
    a task not named; ``sum_t w_t L_t / sum_t w_t``), ignoring NaN labels.

    - binary: BCE with logits; logits [B] (or [B, 1]), labels [B] in {0, 1};
    - multiclass: cross-entropy; logits [B, C], labels class indices [B] (or one-hot [B, C]);
    - multilabel: BCE per label, averaged over the observed (non-NaN) entries of [B, C];
    - regression: Huber (delta 1) of the standardised error ``(out - y) / target_std`` (the
      task's train-split std, 1 when unknown), robust to the heavy tails of length of stay and on
      the scale of the classification losses.

    A task with no labelled sample in the batch is skipped; with none at all the loss is a zero
    that is still connected to the graph (so ``backward`` works on any batch).
    """
    losses, used = [], []
    anchor = None
    for task in tasks:
        name, kind = _task_kind(task)
        out, y = logits[name], labels[name].to(logits[name].device)
        anchor = out.sum() * 0.0 if anchor is None else anchor
        if kind in ("binary", "regression"):
            out, y = out.reshape(-1).float(), y.reshape(-1).float()
            keep = ~torch.isnan(y)
            if not keep.any():
                continue
            if kind == "binary":
                losses.append(F.binary_cross_entropy_with_logits(out[keep], y[keep]))
            else:
                std = float(getattr(task, "target_std", 1.0))
                losses.append(F.huber_loss(out[keep] / std, y[keep] / std, delta=1.0))
            used.append(name)
        elif kind == "multiclass":
            out = out.float()
            if y.dim() == 2:  # one-hot (rows with any NaN are unlabelled)
                keep = ~torch.isnan(y).any(-1)
                y = y.nan_to_num(0.0).argmax(-1)
            else:
                keep = ~torch.isnan(y)
                y = y.nan_to_num(0.0).long()
            if not keep.any():
                continue
            losses.append(F.cross_entropy(out[keep], y[keep].long()))
            used.append(name)
        elif kind == "multilabel":
            out, y = out.float(), y.float()
            keep = ~torch.isnan(y)
            if not keep.any():
                continue
            losses.append(F.binary_cross_entropy_with_logits(out[keep], y[keep]))
            used.append(name)
        else:
            raise ValueError(f"task {name!r}: unknown kind {kind!r}")
    if not losses:
        if anchor is None:
            raise ValueError("task_loss needs at least one task")
        return anchor
    w = torch.tensor([float((weights or {}).get(n, 1.0)) for n in used], device=losses[0].device)
    return (torch.stack(losses) * w).sum() / w.sum()
