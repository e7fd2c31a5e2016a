"""A second MoE backend: DeepSpeed's ``deepspeed.moe.layer.MoE`` driven by our gates.

Kept for comparison (benchmarks/moe_layer.py) and as a fallback. DeepSpeed >= 0.19.4 calls a gate
as ``gate(x, used_token, True, use_tutel)`` and expects
``(l_aux, capacity, num_experts, indices[k, S] (-1 = dropped), locations[k, S], gates[k, S],
exp_counts)``; ``DeepSpeedGate`` produces exactly that from a ``fusemoe.nn.gates.Gate``.
DeepSpeed dispatches into a padded [E, capacity, d] buffer, so it is dropless only with
``capacity_factor=None`` (capacity = the busiest expert's load, read on the host every call).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from fusemoe.nn.experts import Experts
from fusemoe.nn.gates import Gate, GateOutput


class DeepSpeedGate(nn.Module):
    """Our ``Gate`` behind DeepSpeed's gate contract. ``last`` keeps the latest ``GateOutput``
    so the model can compute its own load-balance and entropy losses from ``probs``."""

    def __init__(self, gate: Gate, capacity_factor: float | None = None, min_capacity: int = 4):
        super().__init__()
        self.gate = gate
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.ep_group = None
        self.last: GateOutput | None = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(
        self,
        x: Tensor,
        used_token: Tensor | None = None,
        sparse_routes: bool = True,
        use_tutel: bool = False,
    ):
        out = self.last = self.gate(x)
        idx, weights = out.topk_idx, out.topk_weights
        s, e = out.logits.shape
        k = idx.shape[1]
        if used_token is not None:  # tokens marked unused are routed nowhere
            idx = torch.where(used_token.bool().unsqueeze(-1), idx, -1)
        routed = idx >= 0
        mask = torch.zeros(s, e, dtype=torch.long, device=x.device)
        mask.scatter_add_(1, idx.clamp(min=0), routed.long())
        exp_counts = mask.sum(0)
        # Slot of each route inside its expert's buffer: earlier tokens first.
        locations = (torch.cumsum(mask, 0) - 1).gather(1, idx.clamp(min=0))
        if self.capacity_factor is None:
            capacity = exp_counts.max()
            if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
                dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        else:
            capacity = max(math.ceil(s / e * self.capacity_factor * k), self.min_capacity)
            routed = routed & (locations < capacity)
            capacity = torch.tensor(capacity)
        idx = torch.where(routed, idx, -1)
        locations = locations * routed
        weights = weights * routed
        # Switch-style balance loss, as DeepSpeed's TopKGate reports it.
        l_aux = (out.probs.mean(0) * mask.float().mean(0)).sum() * e / k
        return (
            l_aux,
            capacity,
            e,
            idx.t().to(torch.int32).contiguous(),
            locations.t().to(torch.int32).contiguous(),
            weights.t().float().contiguous(),
            exp_counts,
        )


class DeepSpeedMoELayer(nn.Module):
    """``deepspeed.moe.layer.MoE`` with GELU FFN experts, optionally routed by our gate.

    ``forward(x [N, d]) -> (y [N, d], l_aux)``. ``gate=None`` keeps DeepSpeed's own TopKGate
    (softmax over a linear router, capacity-limited unless ``capacity_factor`` is None).
    For ``ep_size > 1`` the DeepSpeed engine creates the groups (``set_deepspeed_parallelism``).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        gate: Gate | None = None,
        ep_size: int = 1,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        expert = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.moe = MoE(
            d_model,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor or 1.0,
            eval_capacity_factor=capacity_factor or 1.0,
            drop_tokens=capacity_factor is not None,
            use_rts=False,
        )
        if gate is not None:
            self.moe.deepspeed_moe.gate = DeepSpeedGate(gate, capacity_factor)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, l_aux, _ = self.moe(x)
        return y, l_aux

    @torch.no_grad()
    def load_experts(self, experts: Experts, first_expert: int = 0) -> None:
        """Copy experts ``first_expert...`` of a ``fusemoe.nn.experts.Experts`` into this layer."""
        for i, ffn in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            e = first_expert + i
            ffn[0].weight.copy_(experts.w1[e].t())
            ffn[0].bias.copy_(experts.b1[e])
            ffn[2].weight.copy_(experts.w2[e].t())
            ffn[2].bias.copy_(experts.b2[e])
