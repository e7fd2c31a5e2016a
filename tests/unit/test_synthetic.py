"""Synthetic FlexiModal generator: determinism, controllable missingness, cross-modal label."""

import numpy as np
import pandas as pd

from fusemoe.data.flexi import validate_dir
from fusemoe.data.synthetic import generate_synthetic, write_synthetic


def _per_stay_mean(events: pd.DataFrame, variable: str) -> pd.Series:
    return events[events["variable"] == variable].groupby("stay_id", observed=True)["value"].mean()


def test_same_seed_gives_identical_data_and_another_seed_differs():
    a = generate_synthetic(num_stays=200, seed=3)
    b = generate_synthetic(num_stays=200, seed=3)
    c = generate_synthetic(num_stays=200, seed=4)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not a[0]["ihm"].equals(c[0]["ihm"])


def test_modality_missingness_follows_the_requested_probability():
    stays, events, _ = generate_synthetic(
        num_stays=4000, seed=0, missingness={"labs": 0.6, "vitals": 0.0}
    )
    with_labs = events.loc[events["modality"] == "labs", "stay_id"].nunique()
    with_vitals = events.loc[events["modality"] == "vitals", "stay_id"].nunique()
    assert abs(1 - with_labs / len(stays) - 0.6) < 0.03
    assert with_vitals == len(stays)


def test_label_needs_vitals_and_labs_together():
    stays, events, _ = generate_synthetic(num_stays=4000, seed=1, missingness={"labs": 0.0})
    hr = _per_stay_mean(events, "HR")
    lac = _per_stay_mean(events, "Lactate")
    both = stays.set_index("stay_id").join(hr.rename("hr")).join(lac.rename("lac")).dropna()
    y = both["ihm"].to_numpy()
    hr_c = both["hr"].to_numpy() - 85.0
    lac_c = both["lac"].to_numpy() - 2.0
    fused = ((hr_c * lac_c) > 0).astype(int)
    assert (fused == y).mean() > 0.85
    # Either modality alone: the best threshold on it is near chance.
    for x in (hr_c, lac_c):
        best = max(((x > t) == y).mean() for t in np.quantile(x, np.linspace(0.05, 0.95, 19)))
        assert max(best, 1 - best) < 0.6


def test_written_synthetic_dataset_passes_strict_validation(tmp_path):
    manifest = write_synthetic(tmp_path / "syn", num_stays=300, seed=0)
    assert validate_dir(tmp_path / "syn")["source"] == "synthetic"
    assert manifest["counts"]["stays"] == 300
    assert sum(manifest["counts"]["splits"].values()) == 300
    assert set(manifest["norm"]) == {"vitals", "labs", "respiratory", "static"}


def test_multiclass_and_multilabel_labels_follow_the_latents_and_leave_the_rest_alone():
    stays, events, manifest = generate_synthetic(num_stays=4000, seed=1, missingness={"labs": 0.0})
    kinds = {t["name"]: (t["kind"], t["num_outputs"]) for t in manifest["tasks"]}
    assert kinds["acuity"] == ("multiclass", 4) and kinds["phenotype"] == ("multilabel", 3)
    hr = _per_stay_mean(events, "HR") - 85.0
    lac = _per_stay_mean(events, "Lactate") - 2.0
    both = stays.set_index("stay_id").join(hr.rename("hr")).join(lac.rename("lac")).dropna()
    quadrant = 2 * (both["hr"] > 0) + (both["lac"] > 0)
    assert (quadrant == both["acuity"]).mean() > 0.85
    pheno = np.stack(both["phenotype"].to_numpy())
    assert pheno.shape[1] == 3 and set(np.unique(pheno)) == {0, 1}
    assert (pheno[:, 0] == (both["hr"] > 6.0)).mean() > 0.85  # z_vitals > 0.5 <=> HR > 85 + 6


def test_the_note_draws_from_its_own_stream_and_leaves_events_and_other_columns_alone():
    from fusemoe.data.synthetic import synthesize

    stays, events, manifest = generate_synthetic(num_stays=300, seed=2)
    s2, e2, m2, notes = synthesize(num_stays=300, seed=2, note_width=8)
    pd.testing.assert_frame_equal(events, e2)
    same = [c for c in stays.columns if c not in ("ihm", "split")]  # ihm needs the note's latent
    pd.testing.assert_frame_equal(stays[same], s2[same])
    assert not stays["ihm"].equals(s2["ihm"])
    assert {"name": "note", "kind": "embedding", "width": 8} in m2["modalities"]
    assert notes["note"].schema.field("vector").type.list_size == 8
    with_note = notes["note"].column("stay_id").unique().to_pylist()
    assert abs(1 - len(with_note) / 300 - 0.2) < 0.07  # default note missingness 0.2


def test_the_label_needs_the_note_vectors():
    """Given the notes' projection on their direction the label is well predicted; from the
    series latents alone (what vitals and labs reveal) far less."""
    from fusemoe.data.synthetic import synthesize

    stays, events, _, notes = synthesize(
        num_stays=4000, seed=1, missingness={"labs": 0.0, "note": 0.0}, note_width=16
    )
    table = notes["note"]
    vectors = np.asarray(table.column("vector").combine_chunks().flatten()).reshape(-1, 16)
    y_of = stays.set_index("stay_id")["ihm"]
    per_stay = pd.DataFrame(vectors).groupby(table.column("stay_id").to_numpy()).mean()
    direction = np.linalg.svd(per_stay.to_numpy() - per_stay.to_numpy().mean(0))[2][0]
    score = per_stay.to_numpy() @ direction
    y = y_of.loc[per_stay.index].to_numpy()
    note_acc = max(((score > 0) == y).mean(), ((score < 0) == y).mean())
    hr = _per_stay_mean(events, "HR") - 85.0
    lac = _per_stay_mean(events, "Lactate") - 2.0
    both = pd.DataFrame({"hr": hr, "lac": lac}).join(y_of).dropna()
    series_acc = (((both["hr"] * both["lac"]) > 0) == both["ihm"]).mean()
    assert note_acc > 0.72 and series_acc < 0.68 and note_acc > series_acc + 0.08


def test_params_data_synthetic_note_width_makes_prepare_write_the_note_modality(tmp_path):
    import yaml

    from pipelines import config
    from pipelines.prepare import prepare

    params = yaml.safe_load(open("params.yaml"))
    params["data"].update(
        source="synthetic",
        out_dir=str(tmp_path / "out"),
        synthetic={"num_stays": 80, "note_width": 4},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    data = config.load(tmp_path / "params.yaml", ("data",))["data"]
    manifest = prepare(data)
    assert {"name": "note", "kind": "embedding", "width": 4} in manifest["modalities"]
    assert validate_dir(tmp_path / "out")["counts"]["stays_with_modality"]["note"] > 0
