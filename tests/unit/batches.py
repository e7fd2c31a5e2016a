"""Random Batch dicts in the docs/INTERFACES.md format, built from per-sample records.

Building a batch from samples (rather than drawing batch tensors directly) lets tests score the same
sample alone, inside different batches, and with extra padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATIC = "static"

# The smallest FuseMoE (params.yaml ``model`` keys) for tests that run the training loop;
# tests add the gate, router and dropout they are about.
TINY_MODEL = dict(
    d_model=8, n_heads=1, n_layers=1, num_ref_points=4, num_experts=2, top_k=1, expert_hidden=8
)


@dataclass
class Task:
    name: str
    kind: str
    num_outputs: int = 1


@dataclass
class Spec:
    """Duck-typed stand-in for fusemoe.data.dataset.DataSpec."""

    series: dict[str, int] = field(default_factory=lambda: {"vitals": 4, "labs": 3})
    static_dim: int = 5
    tasks: list[Task] = field(default_factory=lambda: [Task("ihm", "binary")])
    embeddings: dict[str, int] = field(default_factory=dict)  # embedding modality -> width


def make_samples(spec: Spec, n: int, seed: int = 0, max_rows: int = 9) -> list[dict]:
    """n random samples; every modality is present with at least one observation."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        series = {}
        for name, v in spec.series.items():
            rows = int(torch.randint(1, max_rows + 1, (1,), generator=g))
            times = torch.sort(torch.rand(rows, generator=g) * 48).values
            mask = (torch.rand(rows, v, generator=g) < 0.6).float()
            mask[:, 0] = 1.0  # every row has an observation
            values = torch.randn(rows, v, generator=g) * mask
            series[name] = {"times": times, "values": values, "mask": mask}
        s_mask = (torch.rand(spec.static_dim, generator=g) < 0.8).float()
        s_mask[0] = 1.0
        static = {"values": torch.randn(spec.static_dim, generator=g) * s_mask, "mask": s_mask}
        labels = {}
        for t in spec.tasks:
            if t.kind == "binary":
                labels[t.name] = torch.randint(0, 2, (), generator=g).float()
            elif t.kind == "regression":
                labels[t.name] = torch.rand((), generator=g) * 10
            elif t.kind == "multiclass":
                labels[t.name] = torch.randint(0, t.num_outputs, (), generator=g).float()
            else:
                labels[t.name] = torch.randint(0, 2, (t.num_outputs,), generator=g).float()
        embeddings = {}
        for name, width in spec.embeddings.items():
            rows = int(torch.randint(1, max_rows + 1, (1,), generator=g))
            times = torch.sort(torch.rand(rows, generator=g) * 48).values
            embeddings[name] = {"times": times, "values": torch.randn(rows, width, generator=g)}
        samples.append(
            {"series": series, "embeddings": embeddings, "static": static, "labels": labels}
        )
    return samples


def drop_modality(sample: dict, name: str) -> dict:
    """The same sample with all events of one series (or embedding) modality removed."""
    if name in sample.get("embeddings", {}):
        width = sample["embeddings"][name]["values"].shape[1]
        empty = {"times": torch.zeros(0), "values": torch.zeros(0, width)}
        return {**sample, "embeddings": {**sample["embeddings"], name: empty}}
    series = dict(sample["series"])
    v = series[name]["values"].shape[1]
    series[name] = {"times": torch.zeros(0), "values": torch.zeros(0, v), "mask": torch.zeros(0, v)}
    return {**sample, "series": series}


def collate(samples: list[dict], extra_pad: int = 0) -> dict:
    """Stack samples into a Batch; L = longest series in the batch (>= 1) plus ``extra_pad`` rows.

    Padding rows have mask 0, values 0, times 0, as the data contract specifies.
    """
    b = len(samples)
    batch: dict = {"series": {}, "present": {}, "labels": {}}
    for name in samples[0]["series"]:
        v = samples[0]["series"][name]["values"].shape[1]
        length = max(1, max(s["series"][name]["times"].numel() for s in samples)) + extra_pad
        values, mask, times = (
            torch.zeros(b, length, v),
            torch.zeros(b, length, v),
            torch.zeros(b, length),
        )
        for i, s in enumerate(samples):
            rec = s["series"][name]
            n = rec["times"].numel()
            values[i, :n], mask[i, :n], times[i, :n] = rec["values"], rec["mask"], rec["times"]
        batch["series"][name] = {"values": values, "mask": mask, "times": times}
        batch["present"][name] = mask.flatten(1).sum(-1) > 0
    for name in samples[0].get("embeddings", {}):
        width = samples[0]["embeddings"][name]["values"].shape[1]
        length = max(1, max(s["embeddings"][name]["times"].numel() for s in samples)) + extra_pad
        values, mask, times = (
            torch.zeros(b, length, width),
            torch.zeros(b, length),
            torch.zeros(b, length),
        )
        for i, s in enumerate(samples):
            rec = s["embeddings"][name]
            n = rec["times"].numel()
            values[i, :n], mask[i, :n], times[i, :n] = rec["values"], 1.0, rec["times"]
        batch.setdefault("embeddings", {})[name] = {"values": values, "mask": mask, "times": times}
        batch["present"][name] = mask.sum(-1) > 0
    static_values = torch.stack([s["static"]["values"] for s in samples])
    static_mask = torch.stack([s["static"]["mask"] for s in samples])
    batch["static"] = {"values": static_values, "mask": static_mask}
    batch["present"][STATIC] = static_mask.sum(-1) > 0
    for name in samples[0]["labels"]:
        batch["labels"][name] = torch.stack([s["labels"][name] for s in samples])
    batch["stay_id"] = [f"s{i}" for i in range(b)]
    return batch


def random_batch(spec: Spec, n: int = 6, seed: int = 0) -> dict:
    return collate(make_samples(spec, n, seed))
