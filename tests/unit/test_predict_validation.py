"""Bad input at predict time: the pyfunc's scorer rejects what the training-time validator rejects,
with the same one-line messages, and never returns a non-finite prediction."""

import numpy as np
import pandas as pd
import pytest
import yaml

from fusemoe.data.dataset import dataset_spec
from fusemoe.data.flexi import load_manifest
from fusemoe.data.synthetic import write_synthetic
from fusemoe.loop import set_seed
from fusemoe.model_io import build_model
from pipelines.packaging import RecordsError, example_records, score_records

TINY_MODEL = {
    "d_model": 8,
    "n_heads": 2,
    "n_layers": 1,
    "num_ref_points": 4,
    "num_experts": 2,
    "top_k": 1,
    "expert_hidden": 8,
}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    data = tmp_path_factory.mktemp("predict") / "flexi"
    write_synthetic(data, num_stays=60, seed=0)
    manifest = load_manifest(data)
    params = yaml.safe_load(open("params.yaml"))["model"] | TINY_MODEL
    set_seed(0)
    spec = dataset_spec(manifest)
    model = build_model(params, spec).eval()
    records = example_records(data, n_stays=3)
    return (lambda r: score_records(model, spec, manifest, r)), records


def _error(scorer, records: pd.DataFrame) -> str:
    score, _ = scorer
    with pytest.raises(RecordsError) as info:
        score(records)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("records")
    return msg


def _static_rows(records: pd.DataFrame) -> pd.DataFrame:
    return records[records["modality"] == "static"]


def test_good_records_score_one_row_per_stay_with_every_task(scorer):
    score, records = scorer
    out = score(records)
    assert len(out) == 3
    assert {"prob_ihm", "los_days", "pred_acuity", "prob_acuity_3", "prob_phenotype_2"} <= set(
        out.columns
    )


def test_empty_records_are_rejected(scorer):
    _, records = scorer
    assert _error(scorer, records.iloc[:0]) == "records: no rows (nothing to score)"


def test_stay_with_only_static_records_is_scored(scorer):
    score, records = scorer
    only_static = _static_rows(records)
    out = score(only_static)
    assert sorted(out["stay_id"]) == sorted(only_static["stay_id"].unique())


def test_one_static_only_stay_among_others_is_scored_like_alone(scorer):
    score, records = scorer
    sid = records["stay_id"].iloc[0]
    static = _static_rows(records)
    mixed = pd.concat([records[records["stay_id"] != sid], static[static["stay_id"] == sid]])
    alone = score(static[static["stay_id"] == sid])
    together = score(mixed).set_index("stay_id").loc[[sid]].reset_index()
    pd.testing.assert_frame_equal(alone, together, atol=1e-6)


def test_unknown_static_variable_is_rejected_at_predict(scorer):
    _, records = scorer
    bad = records.copy()
    row = int(np.flatnonzero(bad["modality"] == "static")[0])
    bad.loc[bad.index[row], "variable"] = "Height"
    msg = _error(scorer, bad)
    assert msg == (
        f"records, row {row}, column 'variable': unknown variable 'Height' for modality 'static'"
        " (not in the manifest)"
    )


def test_repeated_static_value_is_rejected_at_predict(scorer):
    _, records = scorer
    static = _static_rows(records)
    bad = pd.concat([records, static.iloc[:1].assign(value=99.0)], ignore_index=True)
    first = int(np.flatnonzero(bad["modality"] == "static")[0])
    sid, var = static["stay_id"].iloc[0], static["variable"].iloc[0]
    assert _error(scorer, bad) == (
        f"records, row {len(bad) - 1}, column 'variable': stay '{sid}' has static variable "
        f"'{var}' twice (first at row {first})"
    )


def test_unknown_series_variable_is_rejected_with_its_records_row(scorer):
    _, records = scorer
    # Static rows come last in the example; put one first so the events' rows are shifted.
    static = _static_rows(records)
    shuffled = pd.concat([static.iloc[:1], records.drop(static.index[0])], ignore_index=True)
    row = int(np.flatnonzero(shuffled["modality"] == "vitals")[0])
    shuffled.loc[row, "variable"] = "Pulse"
    msg = _error(scorer, shuffled)
    assert msg.startswith(f"records, row {row}, column 'variable': unknown variable 'Pulse'")


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("time_h", -1.0, "negative time -1.0 h"),
        ("time_h", np.inf, "time is not finite (inf)"),
        ("value", np.inf, "value is not finite (inf)"),
        ("value", np.nan, "missing (null) value"),
        ("value", 1e39, "value 1e+39 does not fit float without loss"),
        ("stay_id", "", "empty stay_id"),
        ("stay_id", None, "missing (null) value"),
    ],
)
def test_bad_event_field_is_rejected_naming_row_and_column(scorer, column, value, problem):
    _, records = scorer
    bad = records.astype({"stay_id": object, "value": np.float64})
    bad.loc[bad.index[4], column] = value
    msg = _error(scorer, bad)
    assert msg.startswith(f"records, row 4, column '{column}': {problem}"), msg


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_non_finite_static_value_is_rejected(scorer, value):
    _, records = scorer
    bad = records.copy()
    row = int(np.flatnonzero(bad["modality"] == "static")[0])
    bad.loc[bad.index[row], "value"] = value
    assert _error(scorer, bad).startswith(f"records, row {row}, column 'value': ")


def test_unknown_column_is_rejected(scorer):
    _, records = scorer
    msg = _error(scorer, records.assign(ihm=1))
    assert msg == (
        "records, column 'ihm': unknown column; expected stay_id, modality, variable, time_h, value"
    )


def test_missing_column_is_rejected(scorer):
    _, records = scorer
    assert _error(scorer, records.drop(columns="modality")).startswith(
        "records, column 'modality': required column is missing"
    )


def test_float64_and_int64_records_are_cast_losslessly(scorer):
    score, records = scorer
    wide = records.astype({"time_h": np.float64, "value": np.float64})
    pd.testing.assert_frame_equal(score(wide), score(records))


def test_extreme_value_never_yields_a_non_finite_prediction(scorer):
    score, records = scorer
    bad = records.copy()
    row = int(np.flatnonzero(bad["modality"] == "vitals")[0])
    bad.loc[bad.index[row], "value"] = 3e38
    sid = bad["stay_id"].iloc[row]
    msg = _error(scorer, bad)
    assert msg.startswith(f"records: stay '{sid}': prediction ") and "is nan" in msg


def test_repeated_series_observation_is_rejected_at_predict(scorer):
    _, records = scorer
    row = int(np.flatnonzero(records["modality"] == "vitals")[0])
    bad = pd.concat([records.iloc[[row]].assign(value=1.0), records], ignore_index=True)
    sid, var = records["stay_id"].iloc[row], records["variable"].iloc[row]
    assert _error(scorer, bad).startswith(
        f"records, row {row + 1}, column 'time_h': stay '{sid}' already has a value of vitals '{var}'"
    )
