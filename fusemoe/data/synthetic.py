"""Synthetic FlexiModal data with known ground truth, for tests and quick runs.

Each stay has two latent factors, z_vitals and z_labs ~ N(0, 1). Vitals variable `HR` tracks
z_vitals and labs variable `Lactate` tracks z_labs (other variables are noise or weakly coupled).
The binary task `ihm` is `z_vitals * z_labs > 0` (XOR of the two signs) with 5% label noise:
given only one of the two modalities the label is at chance (AUROC 0.5), so learning it proves
cross-modal fusion. `los_days` (regression) and `los_gt7` depend on z_vitals and the static
`Age`. `acuity` (multiclass, 4 classes) is the quadrant of (z_vitals, z_labs) and `phenotype`
(multilabel, 3 labels) is [z_vitals > 0.5, z_labs > 0.5, Age above 65], each with 5% noise, so
every task kind of the format has a learnable synthetic label. Modalities go missing per stay with a controllable probability; observation times are
irregular (uniform over 48 h) and each variable is observed at a random subset of them.

With `note_width > 0` (`synthesize`) a third latent z_note ~ N(0, 1) enters the label,
`ihm = 1[z_vitals * z_labs + 1.5 z_note > 0]`, and only an embedding modality `note` reveals it:
each note is a `note_width`-d vector `1.5 z_note u + N(0, I)` (u a fixed random unit direction) at
a random time, 1 + Poisson(2) notes per stay, missing for a stay with probability
`missingness["note"]` (default 0.2). Without the notes the label is mostly unpredictable, so a model
that scores well uses them. All of it draws from its own random stream: with the note off, every
column and event of a seed is what it was before.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa

from fusemoe.data.flexi import assign_splits, write_flexi

HORIZON_H = 48.0

# modality -> (mean observation times per stay, {variable: (base, scale on its latent, noise)})
# The latent is z_vitals for vitals, z_labs for labs and respiratory, none for the rest.
SERIES = {
    "vitals": (
        16,
        {
            "HR": (85.0, 12.0, 4.0),
            "SysBP": (120.0, 0.0, 15.0),
            "RespRate": (18.0, 1.0, 3.0),
            "Temp": (37.0, 0.0, 0.5),
        },
    ),
    "labs": (
        4,
        {
            "Lactate": (2.0, 0.8, 0.2),
            "Creatinine": (1.2, 0.0, 0.4),
            "WBC": (10.0, 0.0, 3.0),
            "Glucose": (130.0, 0.0, 30.0),
            "Na": (139.0, 0.0, 3.0),
        },
    ),
    "respiratory": (
        3,
        {"pH": (7.38, 0.0, 0.05), "PaO2": (100.0, 0.0, 25.0), "FiO2": (0.5, 0.0, 0.15)},
    ),
}
STATIC = ["Age", "Sex", "BMI"]
DEFAULT_MISSINGNESS = {"vitals": 0.05, "labs": 0.2, "respiratory": 0.5}
GROUND_TRUTH = (
    "ihm = 1[z_vitals * z_labs > 0] with 5% flipped; HR = 85 + 12 z_vitals + noise; "
    "Lactate = 2 + 0.8 z_labs + noise; los_days = exp(1.9 + 0.3 z_vitals + 0.2 age_z + 0.2 noise); "
    "acuity = 2 * 1[z_vitals > 0] + 1[z_labs > 0] (5% random class); "
    "phenotype = [z_vitals > 0.5, z_labs > 0.5, age_z > 0] (5% flipped each)"
)
NOTE = "note"
NOTE_WEIGHT = 1.5  # of z_note in the ihm score and in each note vector
NOTE_MISSINGNESS = 0.2
NOTE_GROUND_TRUTH = (
    "with the note modality: ihm = 1[z_vitals * z_labs + 1.5 z_note > 0] with 5% flipped; "
    "note vector = 1.5 z_note u + N(0, I), u a fixed unit vector, 1 + Poisson(2) notes per stay"
)


def generate_synthetic(
    num_stays: int = 2000,
    seed: int = 0,
    missingness: dict[str, float] | None = None,
    split: tuple[float, float, float] | list[float] = (0.7, 0.15, 0.15),
    obs_prob: float = 0.7,
    los_threshold_days: float = 7.0,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Return (stays_df, events_df, manifest) in the FlexiModal layout (not yet validated)."""
    stays, events, manifest, _ = synthesize(
        num_stays, seed, missingness, split, obs_prob, los_threshold_days
    )
    return stays, events, manifest


def synthesize(
    num_stays: int = 2000,
    seed: int = 0,
    missingness: dict[str, float] | None = None,
    split: tuple[float, float, float] | list[float] = (0.7, 0.15, 0.15),
    obs_prob: float = 0.7,
    los_threshold_days: float = 7.0,
    note_width: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict[str, pa.Table]]:
    """`generate_synthetic` plus the embedding tables ({} unless `note_width` > 0: then the
    `note` modality the ihm label needs, see the module docstring)."""
    miss = DEFAULT_MISSINGNESS | ({NOTE: NOTE_MISSINGNESS} if note_width else {})
    miss |= missingness or {}
    known = [*SERIES, NOTE] if note_width else list(SERIES)
    unknown = set(miss) - set(known)
    if unknown:
        raise ValueError(f"unknown synthetic modalities {sorted(unknown)}; have {known}")
    rng = np.random.default_rng(seed)
    n = num_stays
    z_v, z_l, age_z = rng.standard_normal((3, n))
    latent = {"vitals": z_v, "labs": z_l, "respiratory": z_l}
    note_rng = np.random.default_rng([seed, 2])  # the note's own stream (see the docstring)
    z_note = note_rng.standard_normal(n) if note_width else np.zeros(n)

    ihm = ((z_v * z_l + NOTE_WEIGHT * z_note) > 0) ^ (rng.random(n) < 0.05)
    los = np.exp(1.9 + 0.3 * z_v + 0.2 * age_z + 0.2 * rng.standard_normal(n)).astype(np.float32)
    los_known = rng.random(n) >= 0.02
    stays = pd.DataFrame(
        {
            "stay_id": [f"s{i:06d}" for i in range(n)],
            "ihm": ihm.astype(np.int8),
            "los_gt7": pd.array(np.where(los_known, los > los_threshold_days, pd.NA), "Int8"),
            "los_days": pd.array(np.where(los_known, los, np.nan), "Float32"),
            "Age": (65 + 15 * age_z).clip(18, 95).astype(np.float32),
            "Sex": pd.array(np.where(rng.random(n) < 0.05, np.nan, rng.random(n) < 0.5), "Float32"),
            "BMI": pd.array(
                np.where(rng.random(n) < 0.1, np.nan, 27 + 5 * rng.standard_normal(n)), "Float32"
            ),
        }
    )
    # The multiclass and multilabel labels draw from their own stream, so adding them changed
    # none of the other columns or events of a given seed.
    extra = np.random.default_rng([seed, 1])
    acuity = 2 * (z_v > 0) + (z_l > 0)
    noisy = extra.random(n) < 0.05
    acuity = np.where(noisy, extra.integers(0, 4, n), acuity).astype(np.int16)
    phenotype = np.stack([z_v > 0.5, z_l > 0.5, age_z > 0], 1) ^ (extra.random((n, 3)) < 0.05)
    stays["acuity"] = acuity
    stays["phenotype"] = list(phenotype.astype(np.int8))
    stays.insert(1, "split", assign_splits(stays, split, seed, "ihm"))

    stay_idx, mod_idx, var_idx, times, values = [], [], [], [], []
    var_names: list[str] = []
    for m, (name, (rate, variables)) in enumerate(SERIES.items()):
        present = rng.random(n) >= miss.get(name, 0.0)
        counts = np.where(present, rng.poisson(rate, n) + 1, 0)
        row_stay = np.repeat(np.arange(n), counts)
        row_time = rng.uniform(0, HORIZON_H, row_stay.size).astype(np.float32)
        for vname, (base, scale, noise) in variables.items():
            seen = rng.random(row_stay.size) < obs_prob
            s = row_stay[seen]
            val = base + scale * latent[name][s] + noise * rng.standard_normal(s.size)
            stay_idx.append(s)
            mod_idx.append(np.full(s.size, m, np.int32))
            var_idx.append(np.full(s.size, len(var_names), np.int32))
            times.append(row_time[seen])
            values.append(val.astype(np.float32))
            var_names.append(vname)
    stay_all = np.concatenate(stay_idx)
    events = pd.DataFrame(
        {
            "stay_id": stays["stay_id"].to_numpy()[stay_all],
            "modality": pd.Categorical.from_codes(np.concatenate(mod_idx), list(SERIES)),
            "variable": pd.Categorical.from_codes(np.concatenate(var_idx), var_names),
            "time_h": np.round(np.concatenate(times), 3),
            "value": np.concatenate(values),
        }
    )
    events = events.sort_values(["stay_id", "modality", "time_h"], kind="stable", ignore_index=True)
    # Times rounded to 0.001 h can coincide; keep one value per (stay, variable, time): the last,
    # which is the one a dataset built from the repeated rows used.
    key = ["stay_id", "modality", "variable", "time_h"]
    events = events.drop_duplicates(key, keep="last", ignore_index=True)
    embeddings = {}
    if note_width:
        embeddings[NOTE] = _notes(note_rng, stays["stay_id"].to_numpy(), z_note, note_width, miss)
    manifest = {
        "source": "synthetic",
        "source_hashes": {},
        "synthetic": {
            "num_stays": n,
            "seed": seed,
            "missingness": miss,
            "obs_prob": obs_prob,
            "ground_truth": GROUND_TRUTH + ("; " + NOTE_GROUND_TRUTH if note_width else ""),
        }
        | ({"note_width": note_width} if note_width else {}),
        "split": {"fractions": list(split), "seed": seed, "stratify": "ihm"},
        "modalities": [
            {"name": name, "kind": "series", "variables": list(v)}
            for name, (_, v) in SERIES.items()
        ]
        + ([{"name": NOTE, "kind": "embedding", "width": note_width}] if note_width else [])
        + [{"name": "static", "kind": "static", "variables": STATIC}],
        "tasks": [
            {"name": "ihm", "kind": "binary", "column": "ihm", "num_outputs": 1},
            {
                "name": "los_gt7",
                "kind": "binary",
                "column": "los_gt7",
                "num_outputs": 1,
                "threshold_days": los_threshold_days,
            },
            {"name": "los_days", "kind": "regression", "column": "los_days", "num_outputs": 1},
            {"name": "acuity", "kind": "multiclass", "column": "acuity", "num_outputs": 4},
            {"name": "phenotype", "kind": "multilabel", "column": "phenotype", "num_outputs": 3},
        ],
    }
    return stays, events, manifest, embeddings


def _notes(
    rng: np.random.Generator, stay_ids: np.ndarray, z: np.ndarray, width: int, miss: dict
) -> pa.Table:
    """Note vectors `NOTE_WEIGHT * z u + N(0, I)` at random times, one table row per note."""
    u = rng.standard_normal(width)
    u /= np.linalg.norm(u)
    present = rng.random(len(z)) >= miss[NOTE]
    counts = np.where(present, rng.poisson(2.0, len(z)) + 1, 0)
    stay = np.repeat(np.arange(len(z)), counts)
    time = np.round(rng.uniform(0, HORIZON_H, stay.size), 3).astype(np.float32)
    vectors = NOTE_WEIGHT * z[stay, None] * u + rng.standard_normal((stay.size, width))
    notes = pd.DataFrame({"stay": stay, "time_h": time}).drop_duplicates(["stay", "time_h"])
    keep = notes.index.to_numpy()  # times rounded to 0.001 h can coincide: one note per time
    return pa.table(
        {
            "stay_id": pa.array(stay_ids[stay[keep]]),
            "time_h": pa.array(time[keep]),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[keep].astype(np.float32).ravel()), width
            ),
        }
    )


def write_synthetic(directory: str | os.PathLike, **kwargs) -> dict:
    """Generate (see `synthesize` for arguments) and write atomically; returns manifest."""
    stays, events, manifest, embeddings = synthesize(**kwargs)
    return write_flexi(directory, stays, events, manifest, embeddings=embeddings)
