"""Classical baselines: summary features are exact on a hand-built dataset; both models learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fusemoe.baselines import STATS, fit_gbm, fit_logreg, labels, summary_features
from fusemoe.data.synthetic import generate_synthetic

MANIFEST = {
    "modalities": [
        {"name": "vitals", "kind": "series", "variables": ["HR", "Temp"]},
        {"name": "labs", "kind": "series", "variables": ["Lactate"]},
        {"name": "static", "kind": "static", "variables": ["Age"]},
    ],
    "tasks": [{"name": "ihm", "kind": "binary", "column": "ihm", "num_outputs": 1}],
}


def tiny() -> tuple[pd.DataFrame, pd.DataFrame]:
    stays = pd.DataFrame(
        {
            "stay_id": ["b", "a", "c"],  # not sorted: output must follow this order
            "split": ["train", "val", "test"],
            "ihm": np.array([1, 0, 0], dtype=np.int8),
            "Age": pd.array([70.0, None, 40.0], dtype="Float32"),
        }
    )
    rows = [  # (stay, modality, variable, time_h, value); deliberately not in time order
        ("a", "vitals", "HR", 5.0, 90.0),
        ("a", "vitals", "HR", 1.0, 80.0),
        ("a", "vitals", "HR", 3.0, 100.0),
        ("a", "labs", "Lactate", 2.0, 1.5),
        ("b", "vitals", "HR", 0.5, 60.0),
        ("b", "vitals", "Temp", 10.0, 38.0),
        ("b", "vitals", "Temp", 4.0, 36.0),
    ]
    events = pd.DataFrame(rows, columns=["stay_id", "modality", "variable", "time_h", "value"])
    events["modality"] = events["modality"].astype("category")
    events["variable"] = events["variable"].astype("category")
    events["time_h"] = events["time_h"].astype(np.float32)
    events["value"] = events["value"].astype(np.float32)
    return stays, events


def test_summary_features_exact():
    stays, events = tiny()
    x = summary_features(stays, events, MANIFEST)
    assert list(x.index) == ["b", "a", "c"]
    expected_cols = [
        f"{m}/{v}/{s}"
        for m, v in [("vitals", "HR"), ("vitals", "Temp"), ("labs", "Lactate")]
        for s in STATS
    ]
    assert list(x.columns) == expected_cols + ["static/Age"]
    hr = x.loc["a", [f"vitals/HR/{s}" for s in STATS]].tolist()
    assert hr == pytest.approx([3, 80.0, 90.0, 80.0, 100.0, 90.0])  # count first last min max mean
    temp = x.loc["b", [f"vitals/Temp/{s}" for s in STATS]].tolist()
    assert temp == pytest.approx([2, 36.0, 38.0, 36.0, 38.0, 37.0])
    assert x.loc["a", "labs/Lactate/first"] == pytest.approx(1.5)
    # unobserved: count 0, statistics missing; a stay without events still has a row
    assert x.loc["a", "vitals/Temp/count"] == 0 and np.isnan(x.loc["a", "vitals/Temp/mean"])
    assert (x.loc["c", [c for c in x.columns if c.endswith("/count")]] == 0).all()
    assert x.loc["b", "static/Age"] == pytest.approx(70.0) and np.isnan(x.loc["a", "static/Age"])
    assert labels(stays, MANIFEST, "ihm").tolist() == [1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def synthetic():
    stays, events, manifest = generate_synthetic(num_stays=1500, seed=3)
    x = summary_features(stays, events, manifest).to_numpy()
    split = stays["split"].to_numpy()
    return stays, manifest, x, split


def _fit_and_score(fit, stays, manifest, x, split, task, **kw) -> float:
    y = labels(stays, manifest, task)
    tr, va, te = ((split == s) & ~np.isnan(y) for s in ("train", "val", "test"))
    sel = fit(x[tr], y[tr], x[va], y[va], **kw)
    assert sel.grid and sel.val_auroc == max(g["val_auroc"] for g in sel.grid)
    return roc_auc_score(y[te], sel.model.predict_proba(x[te])[:, 1])


def test_logreg_learns_linear_signal(synthetic):
    # los_gt7 depends on z_vitals (seen through HR) and Age: a linear signal in the summaries.
    auc = _fit_and_score(fit_logreg, *synthetic, "los_gt7", cs=(0.01, 1.0))
    assert auc > 0.75


def test_gbm_learns_interaction(synthetic):
    # ihm is the XOR of the signs of z_vitals and z_labs: needs trees, not a linear model.
    auc = _fit_and_score(
        fit_gbm,
        *synthetic,
        "ihm",
        learning_rates=(0.1,),
        max_leaf_nodes=(8,),
        l2=(0.0,),
        max_iter=100,
    )
    assert auc > 0.7
