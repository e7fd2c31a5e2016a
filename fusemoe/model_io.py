"""A trained model on disk: weights (loaded with weights_only) plus the config that rebuilds it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from fusemoe.data.dataset import DataSpec
from fusemoe.nn.model import FuseMoE, FuseMoEConfig

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"


def build_model(model_params: dict, spec: DataSpec) -> FuseMoE:
    return FuseMoE(FuseMoEConfig.from_params(model_params), spec)


def save_model(state: dict, model_params: dict, spec: DataSpec, out_dir: Path) -> None:
    """A self-contained copy of the weights and the config needed to rebuild the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / MODEL_FILE)
    (out_dir / MODEL_CONFIG_FILE).write_text(
        json.dumps({"model": model_params, "spec": asdict(spec)}, indent=2)
    )


def load_model(model_dir: Path) -> tuple[FuseMoE, DataSpec]:
    """Rebuilds a model saved by `save_model` (weights only, never pickled code)."""
    from fusemoe.data.dataset import TaskSpec

    cfg = json.loads((Path(model_dir) / MODEL_CONFIG_FILE).read_text())
    s = cfg["spec"]
    spec = DataSpec(
        series=s["series"],
        static_dim=s["static_dim"],
        tasks=[TaskSpec(**t) for t in s["tasks"]],
        static_name=s.get("static_name"),
        embeddings=s.get("embeddings", {}),  # absent in models saved before embedding modalities
    )
    model = build_model(cfg["model"], spec)
    state = torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, spec
