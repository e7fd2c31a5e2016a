"""Routers' gating functions behind one interface: softmax, Laplace, Gaussian, confidence.

Every gate maps tokens x [N, d] to expert logits [N, E] and picks the top-K experts per token.

- logits are always computed in fp32 (input and gate weights are cast), whatever the model dtype;
- distances ``||x - w_e||`` are computed by direct difference (``torch.cdist`` with the matmul
  expansion switched off), never as ``||x||^2 + ||w||^2 - 2 x.w``, which cancels catastrophically
  for near points in low precision;
- the mixing weights of the selected experts are a softmax over the top-K logits only, so they sum
  to 1 per token and the selected experts compete only with each other (as in FuseMoE / Mixtral).
  For K = 1 that weight would be the constant 1 and the gate would get no task gradient, so top-1
  uses the selected expert's probability under the full softmax instead (Switch Transformer);
- optional training noise (Gaussian, std ``noise_std``) perturbs the logits used for *selection and
  mixing* while the model is training; in eval mode routing is deterministic;
- ``probs`` is the full, noise-free router distribution softmax(logits) [N, E], used by the
  load-balance and entropy losses and the routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_TYPES = ("softmax", "laplace", "gaussian", "confidence")


@dataclass
class GateOutput:
    """What a gate hands to the MoE layer (all fp32)."""

    logits: Tensor  # [N, E] noise-free router logits
    probs: Tensor  # [N, E] softmax(logits): the full router distribution, for losses
    topk_idx: Tensor  # long [N, K] selected experts per token
    topk_weights: Tensor  # [N, K] softmax over the selected (possibly noisy) logits (K > 1)


class Gate(nn.Module):
    """Base gate: subclasses define ``scores(x_fp32) -> [N, E]``; selection is shared.

    Expert keys ``weight`` [E, d] are drawn with std ``init_std(d)``, chosen so that for
    layer-normed tokens (norm ~ sqrt(d)) initial logits differ by O(1) across experts: routing
    starts neither uniform nor collapsed. d^-1/2 suits the dot product and the squared distance.
    """

    @staticmethod
    def init_std(d_model: int) -> float:
        return d_model**-0.5

    def __init__(self, d_model: int, num_experts: int, top_k: int, noise_std: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.noise_std = float(noise_std)
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * self.init_std(d_model))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}"

    def scores(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> GateOutput:
        logits = self.scores(x.float())
        select = logits
        if self.training and self.noise_std > 0:
            select = logits + torch.randn_like(logits) * self.noise_std
        top_logits, topk_idx = select.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            weights = select.softmax(dim=-1).gather(1, topk_idx)
        else:
            weights = top_logits.softmax(dim=-1)
        return GateOutput(logits, logits.softmax(dim=-1), topk_idx, weights)


def _distance(x: Tensor, w: Tensor) -> Tensor:
    """Euclidean distances [N, E] by direct difference in fp32 (no ||x||^2 - 2x.w + ||w||^2)."""
    return torch.cdist(x.float(), w.float(), compute_mode="donot_use_mm_for_euclid_dist")


class SoftmaxGate(Gate):
    """Dot-product gate: logit_e = x . w_e (the classic sparse-MoE router)."""

    def scores(self, x: Tensor) -> Tensor:
        return x @ self.weight.float().t()


class LaplaceGate(Gate):
    """FuseMoE's Laplace gate: logit_e = -||x - w_e||_2 (faster estimation rates in the paper).

    Keys start on the tokens' scale (std 1): with small keys every distance is ~||x|| and the
    router would start uniform (logit spread ~ key norm / sqrt(d)).
    """

    @staticmethod
    def init_std(d_model: int) -> float:
        return 1.0

    def scores(self, x: Tensor) -> Tensor:
        return -_distance(x, self.weight)


class GaussianGate(Gate):
    """Gaussian gate: logit_e = -||x - w_e||_2^2."""

    def scores(self, x: Tensor) -> Tensor:
        return -_distance(x, self.weight).square()


class ConfidenceGate(Gate):
    """ConfSMoE-style gate (Zheng et al. 2025, arXiv 2505.19525): per-expert confidences.

    Each expert e has its own confidence head c_e(x) = sigmoid(x . w_e + b_e); the logits are the
    confidence log-odds. Experts do not compete inside a softmax for their *scores* (which is what
    lets softmax routers collapse onto a few experts); they are selected by confidence, and the
    selected experts' outputs are mixed with a softmax over their logits, like every gate here.

    Besides the task gradient through the mixing weights, the heads are fit by
    :meth:`confidence_loss` to a detached *task confidence* target (the model uses the true-class
    probability its prediction gives the sample's label, see ``fusemoe.nn.model``), so an expert
    learns how much it can be trusted for a token. The target is detached so this fit never moves
    the task heads.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, noise_std: float = 0.0):
        super().__init__(d_model, num_experts, top_k, noise_std)
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def scores(self, x: Tensor) -> Tensor:
        return x @ self.weight.float().t() + self.bias.float()

    @staticmethod
    def confidence_loss(selected_logits: Tensor, target: Tensor) -> Tensor:
        """BCE of the selected experts' confidences [N, K] against a per-token target [N] in [0, 1]."""
        target = target.detach().float().clamp(0.0, 1.0).unsqueeze(-1).expand_as(selected_logits)
        return F.binary_cross_entropy_with_logits(selected_logits.float(), target)


_GATES: dict[str, type[Gate]] = {
    "softmax": SoftmaxGate,
    "laplace": LaplaceGate,
    "gaussian": GaussianGate,
    "confidence": ConfidenceGate,
}


def make_gate(
    kind: str, d_model: int, num_experts: int, top_k: int, noise_std: float = 0.0
) -> Gate:
    """Build a gate by name (one of ``GATE_TYPES``)."""
    if kind not in _GATES:
        raise ValueError(f"unknown gate {kind!r}; use one of {', '.join(GATE_TYPES)}")
    return _GATES[kind](d_model, num_experts, top_k, noise_std)
