"""The P12 quality benchmark measures the product: FuseMoE entries train with fusemoe.loop.train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from fusemoe.data.synthetic import write_synthetic
from fusemoe.metrics import best_index

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import p12_quality  # noqa: E402

TINY = dict(d_model=16, n_heads=2, num_ref_points=4, num_experts=4, top_k=2, expert_hidden=16)


@pytest.mark.slow
def test_benchmark_keeps_the_shipped_loops_best_validation_epoch(tmp_path):
    data = tmp_path / "flexi"
    write_synthetic(data, num_stays=300, seed=0)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(TINY)
    params["train"]["batch_size"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "summary.json"
    p12_quality.main(
        [
            *("--data", str(data), "--params", str(tmp_path / "params.yaml")),
            *("--configs", "fusemoe_laplace", "--seeds", "1", "--epochs", "3", "--threads", "1"),
            *("--cache", str(tmp_path / "runs.jsonl"), "--out", str(out)),
            *("--split-cache", str(tmp_path / "splits")),
        ]
    )
    (row,) = json.loads(out.read_text())["configs"]["fusemoe_laplace"]["runs"]
    assert row["settings"]["loop"] == "fusemoe.loop.train"
    history = row["history"]
    # Every epoch's metrics are the loop's own report (val_auroc_<task>, samples_per_s).
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all("samples_per_s" in h for h in history)
    best = best_index([h["val_auroc_ihm"] for h in history], "val_auroc_ihm")
    assert row["chosen"]["epoch"] == best + 1
    # The kept model is that epoch's: rescoring validation gives the loop's number again.
    assert row["val"]["auroc"] == pytest.approx(history[best]["val_auroc_ihm"], abs=1e-6)
    # The seed's split copy lives under --split-cache, with that seed's split recorded.
    manifest = json.loads((tmp_path / "splits" / "seed1" / "manifest.json").read_text())
    assert manifest["split"]["seed"] == 1
