"""Per-variable summary statistics of every series as one extra token (``model.summary_token``).

The gradient-boosting baseline sees, per series variable, its count, first, last, min, max and
mean value; mTAND sees smoothed curves at fixed reference times, from which extremes and counts
are hard to recover. This encoder hands the network the same summaries: for every variable of
every series modality ``log(1 + count)``, first, last, min, max and mean of its (already
normalised) values, each clipped to +-CLIP, and an observed flag; an unobserved variable gives
zeros with flag 0. An MLP maps them to one token [B, 1, d]. Everything is per sample and padding
rows (mask 0) never enter a statistic, so a sample encodes identically in any batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Normalised values beyond this many standard deviations are clipped: one implausible reading
# (a unit error) should not dominate a min or max feature.
CLIP = 10.0
STATS = ("log_count", "first", "last", "min", "max", "mean", "observed")


def variable_summaries(values: Tensor, mask: Tensor, times: Tensor) -> Tensor:
    """``values/mask [B, L, V], times [B, L]`` -> ``[B, V, len(STATS)]`` summary statistics."""
    obs = mask > 0
    count = obs.sum(1)  # [B, V]
    seen = count > 0
    x = values.clamp(-CLIP, CLIP).masked_fill(~obs, 0.0)
    t = times.unsqueeze(-1).expand_as(values)
    first_i = t.masked_fill(~obs, float("inf")).argmin(1, keepdim=True)  # [B, 1, V]
    last_i = t.masked_fill(~obs, float("-inf")).argmax(1, keepdim=True)
    first = x.gather(1, first_i).squeeze(1)
    last = x.gather(1, last_i).squeeze(1)
    lo = x.masked_fill(~obs, float("inf")).amin(1)
    hi = x.masked_fill(~obs, float("-inf")).amax(1)
    mean = x.sum(1) / count.clamp(min=1)
    stats = torch.stack(
        [torch.log1p(count.to(x.dtype)), first, last, lo, hi, mean, seen.to(x.dtype)], dim=-1
    )
    return stats.masked_fill(~seen.unsqueeze(-1), 0.0)


class SummaryEncoder(nn.Module):
    """All series modalities' variable summaries -> one token [B, 1, d]."""

    def __init__(self, series_vars: dict[str, int], d_model: int):
        super().__init__()
        self.series_vars = dict(series_vars)
        n_in = sum(self.series_vars.values()) * len(STATS)
        self.mlp = nn.Sequential(nn.Linear(n_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(
        self, series: dict[str, dict[str, Tensor]], present: dict[str, Tensor], b: int
    ) -> Tensor:
        """``series`` as in a Batch of ``b`` samples (a modality may be absent); a modality
        flagged not present in ``present`` counts as unobserved."""
        ref = self.mlp[0].weight
        parts = []
        for name, nv in self.series_vars.items():
            s = series.get(name)
            if s is None:
                parts.append(ref.new_zeros(b, nv, len(STATS)))
                continue
            stats = variable_summaries(s["values"].to(ref.dtype), s["mask"], s["times"])
            flag = present.get(name)
            if flag is not None:
                stats = stats * flag.to(stats.device, stats.dtype)[:, None, None]
            parts.append(stats)
        return self.mlp(torch.cat(parts, dim=1).flatten(1)).unsqueeze(1)


def any_series_observed(
    series: dict[str, dict[str, Tensor]], present: dict[str, Tensor], b: int, device: torch.device
) -> Tensor:
    """[b] bool: the sample has at least one observation in a present series modality."""
    out = torch.zeros(b, dtype=torch.bool, device=device)
    for name, s in series.items():
        seen = s["mask"].flatten(1).sum(-1) > 0
        if name in present:
            seen = seen & present[name].to(seen.device).bool()
        out = out | seen.to(device)
    return out
