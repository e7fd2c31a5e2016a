"""FuseMoE (Han et al., arXiv 2402.03226) in one file, single-device PyTorch.

    per-modality encoders (mTAND for irregular series, projection + mTAND
               for embedding modalities, MLP for static)                   -> T_m tokens each
    + missing-modality embedding / presence indicator / modality type      -> [B, S, d]
    n_layers x pre-LN Transformer block (self-attention over ONE sample's
               tokens; FFN = sparse MoE layer, or dense for the baseline)  -> [B, S, d]
    LayerNorm, mean over tokens, one linear head per task                  -> logits per task

Every sample has the same token layout (a missing modality still yields its learned "missing"
tokens), so there is no padding in the fusion stack and nothing is ever mixed across samples:
a sample's prediction is the same alone and in any batch.

Parallelism (expert-parallel all-to-all, DeepSpeed) lives in ``fusemoe.parallel`` and swaps the
``Experts`` modules; nothing here knows about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusemoe.nn.gates import GATE_TYPES, ConfidenceGate
from fusemoe.nn.moe import BALANCE_SCOPES, ROUTER_TYPES, DenseFFN, MoELayer, MoEOutput
from fusemoe.nn.mtand import (
    EmbeddingEncoder,
    ModalityTokens,
    MTANDEncoder,
    StaticEncoder,
    series_present,
)
from fusemoe.nn.summary import SummaryEncoder, any_series_observed


@dataclass
class FuseMoEConfig:
    """Model hyper-parameters. Defaults follow the paper's Table 8 (d 128, 8 heads, 48 reference
    points, 16 experts, top-4, expert hidden 512); params.yaml ``model`` holds the CPU profile."""

    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 1
    num_ref_points: int = 48
    num_experts: int = 16
    top_k: int = 4
    expert_hidden: int = 512
    gate: str = "laplace"  # softmax | laplace | gaussian | confidence
    router: str = "per_modality"  # joint | per_modality | disjoint
    gate_noise: float = 0.0  # std of Gaussian noise on gate logits while training
    moe: bool = True  # False = dense FFN baseline
    dropout: float = 0.1
    load_balance_weight: float = 0.01
    entropy_weight: float = 0.01
    # What the load-balance term balances (fusemoe.nn.moe): expert_set = all tokens an expert
    # set receives, pooled over routers; router = each router over all experts (the old term,
    # which fights the entropy regularizer under per_modality routers).
    balance_scope: str = "expert_set"
    # Extensions beyond docs/INTERFACES.md (all optional):
    confidence_weight: float = 1.0  # weight of the confidence gate's head-fitting loss
    time_horizon_h: float = 48.0  # reference times span [0, horizon] hours
    count_features: bool = False  # mTAND tokens also carry log(1 + observations) per variable
    summary_token: bool = False  # one more token of per-variable summaries (fusemoe.nn.summary)
    experts_backend: str = "auto"  # fusemoe.nn.experts backend: auto | grouped | loop
    # > 0: standardised series and static values are clamped to [-value_clip, value_clip] before
    # the encoders (P12 has values 158 train stds out, e.g. WBC; a tree model never sees scale).
    value_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.gate not in GATE_TYPES:
            raise ValueError(f"model.gate={self.gate!r}; use one of {', '.join(GATE_TYPES)}")
        if self.router not in ROUTER_TYPES:
            raise ValueError(f"model.router={self.router!r}; use one of {', '.join(ROUTER_TYPES)}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(
                f"model.balance_scope={self.balance_scope!r}; use one of {', '.join(BALANCE_SCOPES)}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} not divisible by n_heads={self.n_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} must be in [1, {self.num_experts}]")

    @classmethod
    def from_params(cls, model_params: dict[str, Any]) -> FuseMoEConfig:
        """Build from params.yaml's ``model`` section; unknown keys are an error (typos)."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(model_params) - set(known))
        if unknown:
            raise ValueError(f"unknown model params: {', '.join(unknown)}")
        defaults = cls()
        kwargs = {k: type(getattr(defaults, k))(v) for k, v in model_params.items()}
        return cls(**kwargs)


@dataclass
class ModelOutput:
    logits: dict[str, Tensor]  # task -> [B] (binary, regression) or [B, C]
    aux_loss: Tensor  # weighted load-balance + entropy (+ confidence) terms, scalar
    routing: dict[str, Tensor] = field(default_factory=dict)  # detached stats for logging


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as ``rand >= p``: the same distribution, but on CPU
    ``torch.rand`` fills the mask twice as fast as the ``bernoulli_`` that ``F.dropout`` uses
    (three dropouts over [B, S, d] were 6% of a training step)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of each sample ([B, S, d]; no cross-sample op).

    Dropout is applied on the residual branch (in ``Block``), not to attention weights, so the
    fused SDPA kernel is used on CPU as well.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        # Strided [b, h, s, dh] views of q, k, v; a permute of the packed qkv first would copy it.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, s, 3, self.n_heads, -1).unbind(2))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LN Transformer block whose FFN is the MoE layer (or a dense FFN)."""

    def __init__(self, cfg: FuseMoEConfig, modality_tokens: list[int]):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if cfg.moe:
            self.ffn: nn.Module = MoELayer(
                cfg.d_model,
                cfg.expert_hidden,
                cfg.num_experts,
                cfg.top_k,
                modality_tokens,
                gate=cfg.gate,
                router=cfg.router,
                gate_noise=cfg.gate_noise,
                backend=cfg.experts_backend,
                balance_scope=cfg.balance_scope,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.expert_hidden)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEOutput | None]:
        x = x + self.drop(self.attn(self.ln1(x)))
        h = self.ffn(self.ln2(x))
        if isinstance(h, MoEOutput):
            return x + self.drop(h.out), h
        return x + self.drop(h), None


class FuseMoE(nn.Module):
    """The FuseMoE model for a dataset described by ``spec`` (a ``fusemoe.data.dataset.DataSpec``:
    ``series={name: num_vars}``, ``static_dim``, ``tasks=[TaskSpec(name, kind, num_outputs)]``,
    optionally ``embeddings={name: width}``)."""

    def __init__(self, cfg: FuseMoEConfig, spec: Any):
        super().__init__()
        self.cfg = cfg
        self.series_names = list(spec.series)
        embeddings = dict(getattr(spec, "embeddings", None) or {})  # name -> vector width
        self.embedding_names = list(embeddings)
        self.has_static = int(spec.static_dim) > 0
        self.static_name: str | None = getattr(spec, "static_name", None)
        self.tasks = [(t.name, t.kind, int(t.num_outputs)) for t in spec.tasks]
        # Regression heads learn the standardised target (fusemoe.data.dataset.TaskSpec).
        self.target_scale = {
            t.name: (float(getattr(t, "target_mean", 0.0)), float(getattr(t, "target_std", 1.0)))
            for t in spec.tasks
            if t.kind == "regression"
        }

        d = cfg.d_model
        self.series_encoders = nn.ModuleDict(
            {
                name: MTANDEncoder(
                    nv, d, cfg.n_heads, cfg.num_ref_points, cfg.time_horizon_h, cfg.count_features
                )
                for name, nv in spec.series.items()
            }
        )
        self.embedding_encoders = nn.ModuleDict(
            {
                name: EmbeddingEncoder(
                    width,
                    d,
                    cfg.n_heads,
                    cfg.num_ref_points,
                    cfg.time_horizon_h,
                    cfg.count_features,
                )
                for name, width in embeddings.items()
            }
        )
        self.static_encoder = StaticEncoder(spec.static_dim, d) if self.has_static else None
        # Token layout per sample: each series, then each embedding modality -> num_ref_points
        # tokens; static -> 1; the summary token -> 1; in this order.
        timed = self.series_names + self.embedding_names
        self.modality_tokens = [cfg.num_ref_points] * len(timed)
        self.modality_tokens += [1] if self.has_static else []
        self.summary_encoder = (
            SummaryEncoder(spec.series, d) if cfg.summary_token and spec.series else None
        )
        self.modality_tokens += [1] if self.summary_encoder is not None else []
        self.modality_embed = nn.ModuleList(ModalityTokens(n, d) for n in self.modality_tokens)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.modality_tokens) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({name: nn.Linear(d, n) for name, _, n in self.tasks})

    # -- encoders ---------------------------------------------------------------------------
    def encode(self, batch: dict) -> Tensor:
        """All modality tokens of each sample, [B, S, d]."""
        present, tokens = batch.get("present", {}), []
        b = len(batch["stay_id"]) if "stay_id" in batch else len(next(iter(present.values())))
        series, static = batch.get("series", {}), batch.get("static")
        if self.cfg.value_clip > 0:
            series = {n: s | {"values": self._clip(s["values"])} for n, s in series.items()}
            if static is not None:
                static = static | {"values": self._clip(static["values"])}
        # Series and embedding modalities alike: values/mask/times at irregular times -> T tokens.
        timed = [(n, series.get(n), self.series_encoders[n]) for n in self.series_names]
        timed += [
            (n, batch.get("embeddings", {}).get(n), self.embedding_encoders[n])
            for n in self.embedding_names
        ]
        for i, (name, s, encoder) in enumerate(timed):
            if s is None:  # modality absent from the whole batch: all "missing" tokens
                h = self.modality_embed[i].missing.new_zeros(
                    b, self.modality_tokens[i], self.cfg.d_model
                )
                is_present = torch.zeros(b, dtype=torch.bool, device=h.device)
            else:
                h = encoder(s["values"], s["mask"], s["times"])
                flag = present.get(name, torch.ones(h.shape[0], dtype=torch.bool, device=h.device))
                is_present = series_present(flag.to(h.device), s["mask"])
            tokens.append(self.modality_embed[i](h, is_present))
        if self.has_static:
            h = self.static_encoder(static["values"], static["mask"])
            static_embed = self.modality_embed[len(timed)]  # right after the timed modalities
            tokens.append(static_embed(h, self._static_present(batch, static["mask"])))
        if self.summary_encoder is not None:
            h = self.summary_encoder(series, present, b)
            seen = any_series_observed(series, present, b, h.device)
            tokens.append(self.modality_embed[-1](h, seen))
        return torch.cat(tokens, dim=1)

    def _clip(self, values: Tensor) -> Tensor:
        return values.clamp(-self.cfg.value_clip, self.cfg.value_clip)

    def _static_present(self, batch: dict, mask: Tensor) -> Tensor:
        """Static presence: its ``present`` flag (key = the static modality's name, i.e. the one
        key that is not a series or embedding modality) and at least one observed static value."""
        present = batch.get("present", {})
        name = self.static_name
        if name is None:
            timed = self.series_names + self.embedding_names
            extra = [k for k in present if k not in timed]
            name = extra[0] if len(extra) == 1 else None
        observed = mask.flatten(1).sum(-1) > 0
        return observed if name is None else observed & present[name].to(mask.device).bool()

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: dict) -> ModelOutput:
        x = self.drop(self.encode(batch))
        moe_outs: list[MoEOutput] = []
        for block in self.blocks:
            x, moe = block(x)
            if moe is not None:
                moe_outs.append(moe)
        pooled = self.ln_f(x).mean(dim=1)
        logits = {}
        for name, kind, _ in self.tasks:
            out = self.heads[name](pooled)
            if kind == "regression":
                mean, std = self.target_scale[name]
                out = mean + std * out
            logits[name] = out.squeeze(-1) if kind in ("binary", "regression") else out
        aux, routing = self._aux(moe_outs, logits, batch, pooled)
        return ModelOutput(logits=logits, aux_loss=aux, routing=routing)

    def _aux(
        self, moe_outs: list[MoEOutput], logits: dict[str, Tensor], batch: dict, pooled: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted aux loss (mean over MoE layers) and detached routing stats."""
        if not moe_outs:
            return pooled.new_zeros(()), {}
        balance = torch.stack([m.load_balance for m in moe_outs]).mean()
        ent = torch.stack([m.entropy_reg for m in moe_outs]).mean()
        aux = self.cfg.load_balance_weight * balance + self.cfg.entropy_weight * ent
        routing = {
            "load_balance": balance.detach(),
            "entropy_reg": ent.detach(),
            "router_entropy": torch.stack([m.router_entropy for m in moe_outs]).mean(),
            "expert_usage": torch.stack([m.usage for m in moe_outs]).mean(0),  # [M, E]
        }
        if self.cfg.gate == "confidence" and "labels" in batch:
            target = task_confidence(logits, batch["labels"], self.tasks)  # [B], NaN = unlabelled
            if target is not None and not torch.isnan(target).all():
                conf = torch.stack([_confidence_fit(m.conf_logits, target) for m in moe_outs])
                aux = aux + self.cfg.confidence_weight * conf.mean()
                routing["confidence_loss"] = conf.mean().detach()
        return aux, routing


def _confidence_fit(conf_logits: Tensor, target: Tensor) -> Tensor:
    """Fit the selected experts' confidences [B, S, K] to their sample's target [B] (labelled only)."""
    keep = ~torch.isnan(target)
    selected = conf_logits[keep]  # [b, S, K]
    per_token = target[keep].unsqueeze(1).expand(selected.shape[:2])
    return ConfidenceGate.confidence_loss(selected.flatten(0, 1), per_token.flatten())


@torch.no_grad()
def task_confidence(
    logits: dict[str, Tensor], labels: dict[str, Tensor], tasks: list[tuple[str, str, int]]
) -> Tensor | None:
    """ConfSMoE's target: per sample, the probability the model's prediction gives the true label
    (true-class probability), averaged over the labelled tasks; NaN if a sample has no label.

    binary/multilabel: p(y) of each (observed) label; multiclass: softmax prob of the true class;
    regression: exp(-|error|) (1 for a perfect prediction, toward 0 as it degrades).
    """
    per_task = []
    for name, kind, _ in tasks:
        if name not in labels:
            continue
        out, y = logits[name].float(), labels[name].to(logits[name].device).float()
        if kind == "binary":
            p = torch.sigmoid(out.reshape(-1))
            conf = torch.where(y.reshape(-1) > 0.5, p, 1 - p)
            conf = conf.masked_fill(torch.isnan(y.reshape(-1)), math.nan)
        elif kind == "regression":
            conf = torch.exp(-(out.reshape(-1) - y.reshape(-1)).abs())
        elif kind == "multilabel":
            p = torch.sigmoid(out)
            c = torch.where(y > 0.5, p, 1 - p).masked_fill(torch.isnan(y), math.nan)
            conf = c.nanmean(-1)
        else:  # multiclass, labels as indices [B] or one-hot [B, C]
            idx = y.nan_to_num(0).argmax(-1) if y.dim() == 2 else y.nan_to_num(0).long()
            unlabelled = torch.isnan(y).any(-1) if y.dim() == 2 else torch.isnan(y)
            conf = out.softmax(-1).gather(1, idx.long().unsqueeze(1)).squeeze(1)
            conf = conf.masked_fill(unlabelled, math.nan)
        per_task.append(conf)
    if not per_task:
        return None
    return torch.stack(per_task, dim=-1).nanmean(-1)
