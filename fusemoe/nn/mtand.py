"""Modality encoders: mTAND for irregular series and for embedding modalities (vectors at irregular
times), an MLP for static data, missing-modality tokens.

mTAND (Shukla & Marlin, "Multi-Time Attention Networks for Irregularly Sampled Time Series", ICLR
2021) re-samples an irregular multivariate series at T fixed reference times: each reference time
attends over the *observed* times of each variable separately (per-variable masks), with
attention scores between learned Time2Vec embeddings of the times. The T interpolated vectors
become T tokens of width d. Everything is per sample: padding rows (mask 0) get exactly zero
attention weight, so a sample encodes identically in any batch and with any padding length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Time2Vec(nn.Module):
    """Learned time embedding (Kazemi et al. 2019): [w0 t + b0, sin(w_i t + b_i)], i = 1..dim-1.

    Times are given in hours and divided by ``scale_h`` so frequencies start on the scale of the
    observation window.
    """

    def __init__(self, dim: int, scale_h: float = 48.0):
        super().__init__()
        self.scale_h = scale_h
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, dim - 1)

    def forward(self, t: Tensor) -> Tensor:
        t = (t.float() / self.scale_h).to(self.linear.weight.dtype).unsqueeze(-1)
        # Both linears at once as one broadcast multiply-add: on [N, 1] inputs nn.Linear is a
        # GEMM with an inner dimension of 1, slower than this elementwise op.
        weight = torch.cat([self.linear.weight, self.periodic.weight]).view(-1)
        z = torch.addcmul(torch.cat([self.linear.bias, self.periodic.bias]), t, weight)
        return torch.cat([z[..., :1], torch.sin(z[..., 1:])], dim=-1)


class MTANDEncoder(nn.Module):
    """Irregular series ``values/mask [B, L, V], times [B, L]`` -> tokens [B, T, d].

    For every head h, reference time r and variable v, the interpolated value is
    ``sum_l a[h, r, l, v] * x[l, v]`` with ``a = softmax_l(q_r . k_l / sqrt(dk))`` over the times l
    where v was observed (0 if v was never observed). A second channel per variable is the
    attention mass that v's observations receive among all of the sample's observation times: the
    local measurement density, which is informative in clinical data (sicker patients are measured
    more often). Heads x (value, density) x V features are projected to d, and a Time2Vec
    embedding of the reference time is added as the token's position.

    The per-variable softmax is computed as the all-rows softmax renormalised over v's rows
    (numerator / density), which needs no [B, h, T, L, V] tensor. Where v's share of the
    attention is below ``EXACT_MASS`` (its rows score far below the sample's best row, so the
    quotient of two tiny numbers would lose precision, underflow to 0/0, or overflow in the
    backward pass) that entry is recomputed as a softmax over v's own rows: every observed
    variable gets its exact attention average, however little mass it has.

    With ``count_features``, every token also gets ``log(1 + number of observations)`` of each
    variable: the density channel is relative (a share of the sample's observation times), so
    without it the model cannot tell 10 heart-rate readings from 100.

    Reference times are fixed: ``linspace(0, horizon_h, T)`` hours.
    """

    def __init__(
        self,
        num_vars: int,
        d_model: int,
        n_heads: int,
        num_ref_points: int,
        horizon_h: float = 48.0,
        count_features: bool = False,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.register_buffer("ref_times", torch.linspace(0.0, horizon_h, num_ref_points))
        self.time_embed = Time2Vec(d_model, scale_h=horizon_h)
        self.query = nn.Linear(d_model, d_model)
        # No key bias: it would only add a constant over the key times to every score (see
        # interpolate). Models saved with one load unchanged (_drop_key_bias).
        self.key = nn.Linear(d_model, d_model, bias=False)
        self._register_load_state_dict_pre_hook(_drop_key_bias)
        self.count_features = count_features
        self.proj = nn.Linear((n_heads * 2 + count_features) * num_vars, d_model)
        self.position = nn.Linear(d_model, d_model)

    def forward(self, values: Tensor, mask: Tensor, times: Tensor) -> Tensor:
        b = values.shape[0]
        value, density = self.interpolate(values, mask, times)
        ref = self.time_embed(self.ref_times)
        feats = torch.cat([value, density], dim=-1)  # [B, h, T, 2V]
        feats = feats.permute(0, 2, 1, 3).reshape(b, self.ref_times.numel(), -1)
        if self.count_features:
            counts = torch.log1p(mask.sum(1)).to(feats.dtype)  # [B, V]
            feats = torch.cat([feats, counts[:, None, :].expand(-1, feats.shape[1], -1)], dim=-1)
        return self.proj(feats) + self.position(ref)

    def interpolate(self, values: Tensor, mask: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """Per head, reference time and variable: (attention average of v, v's attention mass),
        both [B, h, T, V]; an unobserved variable gives (0, 0)."""
        b, _, num_vars = values.shape
        h, dk = self.n_heads, self.head_dim
        dtype = self.proj.weight.dtype  # fp32 batches feed a bf16 model too
        values, mask = values.to(dtype), mask.to(dtype)
        ref = self.time_embed(self.ref_times)  # [T, d]
        t = ref.shape[0]
        # The 1/sqrt(dk) scale on the [T, h, dk] queries, not on the [B, L, h*T] scores.
        q = self.query(ref).view(t, h, dk) / math.sqrt(dk)
        # q . (W_k e + b_k) = (q W_k) . e + q . b_k for a key time's embedding e: the key
        # projection folds into the h*T queries (one GEMM with the embeddings instead of a key
        # GEMM and a score GEMM of the same size), and q . b_k is constant over the key times,
        # so the softmax below does not see it (b_k gets no gradient).
        qk = torch.einsum("thc,hcj->htj", q, self.key.weight.view(h, dk, -1)).reshape(h * t, -1)
        scores = self.time_embed(times) @ qk.t()  # [B, L, h*T]

        # Attention over the sample's observation times (rows where any variable was observed).
        row = (mask.sum(-1) > 0)[:, :, None]  # [B, L, 1]
        # A sample with no observation at all gets uniform weights here, not the zeros of
        # _masked_softmax, but they only ever multiply its all-zero mask and values below, so
        # its features are exactly 0 either way, without a pass over [B, L, h*T] to zero them.
        attn = scores.masked_fill(~row, -1e30).softmax(dim=1)  # over the times L
        # Per-variable softmax = the row softmax restricted to v's rows and renormalised, so it is
        # computed without materialising [B, h, T, L, V]: numerator and normaliser per variable.
        # One product for both: [mask | values * mask] -> [density | numerator].
        observed = values * mask
        out = torch.bmm(attn.transpose(1, 2), torch.cat([mask, observed], dim=-1))
        density, numerator = out.view(b, h, t, 2 * num_vars).chunk(2, dim=-1)
        ok = density >= EXACT_MASS  # density is the normaliser; also a feature
        value = numerator / torch.where(ok, density, torch.ones_like(density))
        # Entries of observed variables with (nearly) no mass: a softmax over v's own rows.
        redo = ~ok & (mask.sum(1) > 0)[:, None, None, :]
        if redo.any():
            bi, hi, ti, vi = redo.nonzero(as_tuple=True)
            keep = mask[bi, :, vi] > 0  # [n, L]
            own = _masked_softmax(scores[bi, :, hi * t + ti], keep, dim=1)
            exact = (own * observed[bi, :, vi]).sum(1)
            value = value.index_put((bi, hi, ti, vi), exact)
        return value, density


def _drop_key_bias(state_dict: dict, prefix: str, *_args) -> None:
    """Models saved before the key bias was removed carry one; it never changed an output."""
    state_dict.pop(prefix + "key.bias", None)


# Below this attention mass a variable's average is recomputed over its own rows (see
# MTANDEncoder). Above it, numerator / density is accurate to the dtype's precision (v's terms
# are far above fp32/bf16's smallest normal, 1e-38) and its gradient (~ value / density) stays
# far from overflow (3e38); below it, the row softmax's entries for v may be subnormal or 0.
EXACT_MASS = 1e-12


def _masked_softmax(scores: Tensor, keep: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` restricted to ``keep``; all-masked slices give all-zero weights.

    Masked entries get exactly zero weight (exp of a huge negative), so padding never changes a
    sample's result; no NaN appears in forward or backward when nothing is kept.
    """
    masked = scores.masked_fill(~keep, -1e30)
    any_kept = keep.any(dim=dim, keepdim=True)
    return masked.softmax(dim=dim) * any_kept


class EmbeddingEncoder(nn.Module):
    """An embedding modality ``values [B, L, width], mask/times [B, L]`` -> tokens [B, T, d].

    As the reference does for notes and chest X-rays: each vector (one per time stamp) is
    layer-normalised (so encoders of any output scale need no dataset statistics) and projected
    to d, then mTAND re-samples the projected sequence at the reference times, every projected
    dimension being a variable observed wherever a vector is.
    """

    def __init__(
        self,
        width: int,
        d_model: int,
        n_heads: int,
        num_ref_points: int,
        horizon_h: float = 48.0,
        count_features: bool = False,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, d_model)
        self.mtand = MTANDEncoder(
            d_model, d_model, n_heads, num_ref_points, horizon_h, count_features
        )

    def forward(self, values: Tensor, mask: Tensor, times: Tensor) -> Tensor:
        x = self.proj(self.norm(values.to(self.proj.weight.dtype)))
        m = mask.to(x.dtype)[..., None].expand_as(x)
        return self.mtand(x * m, m, times)


class StaticEncoder(nn.Module):
    """Static features ``values/mask [B, S]`` -> one token [B, 1, d] (MLP on values and mask)."""

    def __init__(self, static_dim: int, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * static_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(self.mlp[0].weight.dtype)
        return self.mlp(torch.cat([values.to(mask.dtype) * mask, mask], dim=-1)).unsqueeze(1)


class ModalityTokens(nn.Module):
    """Type, presence and missing-modality embeddings for one modality's T tokens.

    A present modality keeps its encoder tokens; a missing one gets a learned "missing" embedding
    per token position instead (never silent zeros). Every token then gets the modality-type
    embedding plus a learned presence/absence indicator embedding, so the fusion layers can tell
    "observed" from "imputed" regardless of what the encoder produced.
    """

    def __init__(self, num_tokens: int, d_model: int):
        super().__init__()
        self.missing = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(d_model) * 0.02)
        self.presence = nn.Embedding(2, d_model)  # 0 = missing, 1 = present
        nn.init.normal_(self.presence.weight, std=0.02)

    def forward(self, tokens: Tensor, present: Tensor) -> Tensor:
        present = present.bool()
        tokens = torch.where(present[:, None, None], tokens, self.missing.to(tokens.dtype))
        return tokens + self.type_embed + self.presence(present.long()).unsqueeze(1)


def series_present(present: Tensor, mask: Tensor) -> Tensor:
    """A series counts as present only if flagged present *and* it has an observation.

    So "present False" and "no events" are the same input to the model.
    """
    return present.bool() & (mask.flatten(1).sum(-1) > 0)


__all__ = [
    "EmbeddingEncoder",
    "MTANDEncoder",
    "ModalityTokens",
    "StaticEncoder",
    "Time2Vec",
    "series_present",
]
