"""The sparse MoE layer that replaces a Transformer block's FFN, and the dense FFN baseline.

Input is ``x [B, S, d]`` where the S tokens of every sample are laid out modality by modality in a
fixed order (``modality_tokens[m]`` tokens for modality m). Because that layout is static, the
routers find each modality's tokens by slicing, not by a data-dependent gather. Routing is per
token: the only reshapes are [B, n, d] <-> [B*n, d], which never mix samples.

Routers:
- ``joint``: one gate over all tokens, one shared expert set;
- ``per_modality``: one gate per modality, one shared expert set (FuseMoE's default);
- ``disjoint``: one gate and one expert set per modality.
Every gate and expert set is a registered submodule, so all of them are trained.

Load balance is a property of an expert set: an expert's load is every token it receives,
whichever router sent it. So the balance term (``balance_scope: expert_set``) pools the tokens of
all routers that share an expert set: one term for ``joint`` and ``per_modality``, one per
modality for ``disjoint``. For ``per_modality`` this is what lets FuseMoE's entropy regularizer
work: it asks each modality for its own confident subset of the shared experts, and the pooled
balance asks only that those subsets cover the experts evenly, so both can be at their optimum
at once. ``balance_scope: router`` (the former term) balances each router over *all* experts,
which is exactly what the entropy term pushes against: with M modalities on disjoint subsets it
costs M times the uniform value. On P12 (benchmarks/routing_balance.py) one of the two loses:
with Gaussian top-4 routers (the committed run) modalities specialise anyway and the per-router
term sits at ~2x uniform all training, pulling against it; with Laplace top-2 it wins
and modalities hardly specialise (entropy term -0.06 of its -log 4 floor; pooled: -0.93, with
the shared experts still evenly used).

The pooled term weights modalities by their token counts (it measures load); the entropy term
weights them equally (a uniform prior over modalities). They agree when modalities have equal
token counts; a 1-token static modality carries little weight in the balance, so its experts are
only lightly pushed to be shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusemoe.nn.experts import Experts
from fusemoe.nn.gates import GateOutput, make_gate
from fusemoe.nn.losses import entropy, entropy_regularizer, load_balance_loss

ROUTER_TYPES = ("joint", "per_modality", "disjoint")
BALANCE_SCOPES = ("expert_set", "router")


@dataclass
class MoEOutput:
    out: Tensor  # [B, S, d]
    load_balance: Tensor  # scalar, unweighted; mean over expert sets (or routers, see scope)
    entropy_reg: Tensor  # scalar, unweighted FuseMoE entropy regularizer (0 for disjoint)
    usage: Tensor  # [M, E] fraction of modality m's token-expert assignments per expert (detached)
    router_entropy: Tensor  # scalar, mean per-token entropy of the router distribution (detached)
    conf_logits: Tensor | None  # [B, S, K] selected experts' logits (confidence gate only)


class MoELayer(nn.Module):
    """Router(s) + gate + dropless ``Experts``; returns the output and its aux-loss terms."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        modality_tokens: Sequence[int],
        gate: str = "laplace",
        router: str = "per_modality",
        gate_noise: float = 0.0,
        backend: str = "auto",
        balance_scope: str = "expert_set",
    ):
        super().__init__()
        if router not in ROUTER_TYPES:
            raise ValueError(f"unknown router {router!r}; use one of {', '.join(ROUTER_TYPES)}")
        if balance_scope not in BALANCE_SCOPES:
            raise ValueError(
                f"unknown balance_scope {balance_scope!r}; use one of {', '.join(BALANCE_SCOPES)}"
            )
        self.router, self.gate_type, self.balance_scope = router, gate, balance_scope
        self.num_experts, self.top_k = num_experts, top_k
        self.modality_tokens = list(modality_tokens)
        num_routers = 1 if router == "joint" else len(self.modality_tokens)
        num_expert_sets = len(self.modality_tokens) if router == "disjoint" else 1
        self.gates = nn.ModuleList(
            make_gate(gate, d_model, num_experts, top_k, gate_noise) for _ in range(num_routers)
        )
        self.experts = nn.ModuleList(
            Experts(num_experts, d_model, hidden, backend=backend) for _ in range(num_expert_sets)
        )

    def _segments(self, x: Tensor) -> list[Tensor]:
        """Split [B, S, d] into the per-modality slices [B, n_m, d]."""
        return list(torch.split(x, self.modality_tokens, dim=1))

    def forward(self, x: Tensor) -> MoEOutput:
        b, s, d = x.shape
        if s != sum(self.modality_tokens):
            raise ValueError(f"expected {sum(self.modality_tokens)} tokens per sample, got {s}")
        segments = self._segments(x)

        # Route: one GateOutput per router, each over [B * n, d] tokens.
        if self.router == "joint":
            routed = [self.gates[0](x.reshape(b * s, d))]
        else:
            routed = [g(seg.reshape(-1, d)) for g, seg in zip(self.gates, segments, strict=True)]

        # Experts: one call over all tokens when experts are shared, one per modality otherwise.
        if self.router == "disjoint":
            outs = [
                ex(seg.reshape(-1, d), r.topk_idx, r.topk_weights).view(seg.shape)
                for ex, seg, r in zip(self.experts, segments, routed, strict=True)
            ]
            out = torch.cat(outs, dim=1)
        else:
            idx = self._per_token(routed, b, "topk_idx")
            weights = self._per_token(routed, b, "topk_weights")
            out = self.experts[0](
                x.reshape(b * s, d), idx.reshape(b * s, -1), weights.reshape(b * s, -1)
            )
            out = out.view(b, s, d)

        return self._stats(out, routed, b)

    @staticmethod
    def _per_token(routed: list[GateOutput], b: int, field: str) -> Tensor:
        """Reassemble a per-token gate field [N_r, X] of every router as [B, S, X] (token order)."""
        return torch.cat([(t := getattr(r, field)).view(b, -1, t.shape[-1]) for r in routed], 1)

    def _balance(self, routed: list[GateOutput]) -> Tensor:
        """Load balance of each expert set over all the tokens it receives, averaged over the
        sets (``balance_scope: router``: of each router over its own tokens, averaged)."""
        shared = self.router != "disjoint" and self.balance_scope == "expert_set"
        groups = [routed] if shared else [[r] for r in routed]
        return torch.stack(
            [
                load_balance_loss(
                    torch.cat([r.probs for r in g]), torch.cat([r.topk_idx for r in g])
                )
                for g in groups
            ]
        ).mean()

    def _stats(self, out: Tensor, routed: list[GateOutput], b: int) -> MoEOutput:
        probs = self._per_token(routed, b, "probs")  # [B, S, E]
        idx = self._per_token(routed, b, "topk_idx")  # [B, S, K]
        mod_probs = [
            p.reshape(-1, self.num_experts) for p in torch.split(probs, self.modality_tokens, 1)
        ]
        mod_idx = [i.reshape(-1, self.top_k) for i in torch.split(idx, self.modality_tokens, 1)]

        balance = self._balance(routed)
        if self.router == "disjoint":
            # Experts are not shared, so I(modality; expert) is fixed at log M: no signal.
            entropy_reg = probs.new_zeros(())
        else:
            entropy_reg = entropy_regularizer(torch.stack([p.mean(0) for p in mod_probs]))

        with torch.no_grad():
            usage = torch.stack(
                [F.one_hot(i.reshape(-1), self.num_experts).float().mean(0) for i in mod_idx]
            )
            router_entropy = entropy(probs).mean()

        conf_logits = None
        if self.gate_type == "confidence":
            picked = [r.logits.gather(1, r.topk_idx).view(b, -1, self.top_k) for r in routed]
            conf_logits = torch.cat(picked, dim=1)
        return MoEOutput(out, balance, entropy_reg, usage, router_entropy, conf_logits)


class DenseFFN(nn.Module):
    """The no-MoE baseline: one GELU FFN d -> hidden -> d applied to every token."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
