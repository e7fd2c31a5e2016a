"""Training on a user's FlexiModal directory with an embedding modality, by params only (issue 16):
`data.source: flexi` + `data.flexi_dir`, then the real prepare and train stages (Ray Train,
DeepSpeed, MLflow) in a copy of the project."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from project_copy import copy_project, local_env
from test_pipeline import run, tiny_params

from fusemoe.data.synthetic import write_synthetic

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def test_a_flexi_directory_with_an_embedding_modality_trains_by_params_only(tmp_path):
    mine = tmp_path / "mine"
    write_synthetic(mine, num_stays=200, seed=0, note_width=8)  # a `note` embedding modality
    work = copy_project(tmp_path / "project")
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tmp_path)
    params["data"].update(source="flexi", flexi_dir=str(mine))
    params["train"].update(epochs=1, tasks=["ihm"], use_best_params=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = local_env(work, tmp_path)
    run([str(BIN / "python"), "-m", "pipelines.prepare"], work, env)
    manifest = json.loads((work / "data/processed/manifest.json").read_text())
    assert {"name": "note", "kind": "embedding", "width": 8} in manifest["modalities"]
    assert manifest["counts"]["stays_with_modality"]["note"] > 0
    run([str(BIN / "python"), "-m", "pipelines.train"], work, env)
    spec = json.loads((work / "models/train/model_config.json").read_text())["spec"]
    assert spec["embeddings"] == {"note": 8}
    history = json.loads((work / "metrics/train_history.json").read_text())
    assert 0.0 <= history[-1]["val_auroc_ihm"] <= 1.0
