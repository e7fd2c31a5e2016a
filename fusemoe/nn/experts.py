"""Dropless expert FFNs: sort token-expert pairs by expert, one grouped GEMM, weighted scatter-add.

The reference FuseMoE code loops over experts in Python and DeepSpeed (<= 0.19.3) used a one-hot
capacity einsum that drops tokens. Here every (token, expert) pair is computed, nothing is dropped,
and the forward pass never reads a device value on the host (no ``.item()``, ``.tolist()``,
``bincount`` or ``nonzero``), so CUDA graphs and ``torch.compile(fullgraph=True)`` can capture it.
The only exception is ``backend="loop"``, which slices per expert and therefore syncs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Backend = Literal["auto", "grouped", "loop"]

# F.grouped_mm is the public name from torch 2.10 on; torch._grouped_mm is the same aten op.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    return _grouped_mm is not None


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the expert kernel. "auto" means grouped GEMM wherever torch has it.

    On CUDA the grouped op has a CUTLASS fast path for bf16 on sm90/sm100; other dtypes or GPUs
    run torch's own per-group fallback (correct, but it copies ``offs`` to the host). On CPU the
    2-core measurement (benchmarks/moe_layer.py, docs/MOE_PERFORMANCE.md) decides: see
    ``CPU_DEFAULT``.
    """
    if backend not in ("auto", "grouped", "loop"):
        raise ValueError(f"unknown experts backend {backend!r}; use auto, grouped or loop")
    if backend == "loop" or not grouped_mm_available():
        return "loop"
    if backend == "grouped":
        return "grouped"
    if device.type == "cpu":
        return CPU_DEFAULT
    return "grouped"


# Measured on the 2-core CPU at the FuseMoE size (docs/MOE_PERFORMANCE.md): per-expert blocks stay
# in cache, so the loop beats one grouped GEMM over [N*K, h] buffers; on CPU a "sync" costs nothing.
CPU_DEFAULT = "loop"


def expert_counts(flat_expert: Tensor, num_experts: int) -> Tensor:
    """Tokens per expert as a fixed-size [E] tensor.

    ``torch.bincount`` would do, but on CUDA it reads ``max()`` on the host to size its output;
    a scatter-add into a fixed [E] buffer has a static shape and never syncs.
    """
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_expert.device)
    return counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))


class Experts(nn.Module):
    """E independent two-layer GELU FFNs, d -> h -> d, stored as stacked weights.

    ``forward(x [N, d], expert_idx long[N, K], weights [N, K]) -> [N, d]``: token n's output is
    ``sum_k weights[n, k] * FFN_{expert_idx[n, k]}(x[n])``, accumulated in fp32.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: Backend = "auto"):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.backend = backend
        resolve_backend(backend, torch.device("cpu"), torch.float32)  # validate early
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, backend={self.backend}"

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        n, k = expert_idx.shape
        order, token, counts = sort_by_expert(expert_idx, self.num_experts)
        y = self.ffn(x[token], counts)
        y = y.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
        out = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, y).to(x.dtype)

    def ffn(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Run rows ``xs`` [M, d], grouped by expert (``counts[e]`` rows for expert e, in order)."""
        xs = xs.to(self.w1.dtype)
        if resolve_backend(self.backend, xs.device, xs.dtype) == "loop":
            return _ffn_loop(xs, counts, self.w1, self.b1, self.w2, self.b2)
        return _ffn_grouped(xs, counts, self.w1, self.b1, self.w2, self.b2)


def sort_by_expert(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten the N*K token-expert pairs and stable-sort them by expert.

    Returns ``order`` (pair index of each sorted row), ``token`` (its token index) and
    ``counts`` [E] (rows per expert). Stable, so each expert sees its tokens in input order.
    """
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = torch.div(order, expert_idx.shape[1], rounding_mode="floor")
    return order, token, expert_counts(flat, num_experts)


def _ffn_grouped(
    xs: Tensor, counts: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    # Row -> expert id, sized by xs (known) so repeat_interleave does not sync to size its output.
    row_expert = torch.repeat_interleave(
        torch.arange(counts.shape[0], device=xs.device), counts, output_size=xs.shape[0]
    )
    h = F.gelu(_DenseGrad.apply(_grouped_mm(xs, w1, offs=offs)) + b1[row_expert])
    return _DenseGrad.apply(_grouped_mm(h, w2, offs=offs)) + b2[row_expert]


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous: the grouped GEMM backward
    rejects expanded grads (e.g. from ``.sum()``) with "Invalid strides/sizes"."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.numel() == 0:  # an empty expanded grad counts as contiguous; give it real strides
            return grad.new_zeros(grad.shape)
        return grad.contiguous()


def _ffn_loop(xs: Tensor, counts: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """One GEMM pair per expert over its contiguous block of rows (``tolist`` syncs on CUDA).

    ``split``/``unbind`` rather than ``xs[a:b]``/``w1[e]``: their backward concatenates/stacks
    once, where per-slice indexing would zero-fill a full-size gradient buffer per expert.
    """
    blocks = torch.split(xs, counts.tolist())
    params = zip(w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0), strict=True)
    outs = [
        F.gelu(xe @ w1e + b1e) @ w2e + b2e
        for xe, (w1e, b1e, w2e, b2e) in zip(blocks, params, strict=True)
    ]
    return torch.cat(outs)


def reference_moe(
    x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Plain per-expert Python loop, as in the reference FuseMoE code: the ground truth in tests
    and baseline (a) in benchmarks. Finds each expert's tokens with a mask (host sync per expert)."""
    out = torch.zeros(x.shape[0], w2.shape[-1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(expert_idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].to(w1.dtype)
        y = F.gelu(xe @ w1[e] + b1[e]) @ w2[e] + b2[e]
        out.index_add_(0, tok, y.float() * weights[tok, slot].float().unsqueeze(-1))
    return out.to(x.dtype)
