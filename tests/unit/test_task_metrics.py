"""Metrics of every task kind: values against scikit-learn, NaN labels, names a metric may select."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fusemoe.data.dataset import DataSpec, TaskSpec
from fusemoe.inference import NonFinitePrediction, predictions_table
from fusemoe.metrics import (
    KIND_METRICS,
    higher_is_better,
    multiclass_metrics,
    multilabel_metrics,
    task_metrics,
)

RNG = np.random.default_rng(0)


def test_multiclass_metrics_match_scikit_learn_and_ignore_unlabelled_samples():
    y = RNG.integers(0, 4, 200).astype(float)
    p = RNG.dirichlet(np.ones(4), 200) + np.eye(4)[y.astype(int)] * 0.3
    p /= p.sum(1, keepdims=True)
    y_nan = y.copy()
    y_nan[:20] = np.nan
    m = multiclass_metrics(y_nan, p)
    yk, pk = y[20:].astype(int), p[20:]
    assert m["n"] == 180
    assert m["accuracy"] == pytest.approx((pk.argmax(1) == yk).mean())
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(yk, pk, multi_class="ovr"))
    assert 0.0 < m["macro_f1"] < 1.0


def test_multiclass_macro_auroc_averages_only_classes_that_occur():
    y = np.array([0, 0, 1, 1, 0, 1], float)  # class 2 never occurs in this split
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]] * 2)
    m = multiclass_metrics(y, p)
    assert m["macro_auroc"] == pytest.approx(
        np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1)])
    )


def test_multilabel_macro_and_micro_match_scikit_learn_with_missing_entries():
    y = (RNG.random((300, 5)) < 0.3).astype(float)
    p = np.clip(0.5 * y + 0.5 * RNG.random((300, 5)), 0, 1)
    y[RNG.random((300, 5)) < 0.1] = np.nan
    y[:, 4] = np.where(np.isnan(y[:, 4]), np.nan, 0.0)  # a label with no positive: skipped in macro
    m = multilabel_metrics(y, p)
    seen = ~np.isnan(y)
    per = [(seen[:, k], k) for k in range(4)]
    assert m["macro_auroc"] == pytest.approx(
        np.mean([roc_auc_score(y[s, k], p[s, k]) for s, k in per])
    )
    assert m["macro_auprc"] == pytest.approx(
        np.mean([average_precision_score(y[s, k], p[s, k]) for s, k in per])
    )
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(y[seen], p[seen]))
    assert m["micro_auprc"] == pytest.approx(average_precision_score(y[seen], p[seen]))


def test_every_logged_metric_name_has_a_direction():
    for _, keys in KIND_METRICS.values():
        for k in keys:
            higher_is_better(f"eval_val_{k}_task")  # raises for an unknown metric name
    for kind in ("multiclass", "multilabel"):
        assert all(higher_is_better(f"val_{k}_task") for k in KIND_METRICS[kind][1])


def _pred(logits: dict, labels: dict) -> dict:
    return {"stay_id": [f"s{i}" for i in range(6)], "logits": logits, "labels": labels}


SPEC = DataSpec(
    series={},
    static_dim=0,
    tasks=[TaskSpec("act", "multiclass", 3), TaskSpec("ph", "multilabel", 2)],
)


def test_validation_metrics_name_multiclass_and_multilabel_tasks():
    logits = {"act": RNG.standard_normal((6, 3)), "ph": RNG.standard_normal((6, 2))}
    labels = {
        "act": np.array([0, 1, 2, 0, 1, 2], float),
        "ph": np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]], float),
    }
    got = task_metrics(_pred(logits, labels), SPEC, "val")
    assert set(got) == {
        "val_accuracy_act",
        "val_macro_f1_act",
        "val_macro_auroc_act",
        "val_macro_auroc_ph",
        "val_micro_auroc_ph",
        "val_macro_auprc_ph",
        "val_micro_auprc_ph",
    }


def test_prediction_table_has_class_and_label_probabilities():
    logits = {"act": RNG.standard_normal((6, 3)), "ph": RNG.standard_normal((6, 2))}
    table = predictions_table(_pred(logits, {}), SPEC)
    probs = table[["prob_act_0", "prob_act_1", "prob_act_2"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert (table["pred_act"] == logits["act"].argmax(1)).all()
    np.testing.assert_allclose(table["prob_ph_1"], 1 / (1 + np.exp(-logits["ph"][:, 1])))


def test_a_non_finite_prediction_is_refused_naming_the_stay():
    logits = {"act": RNG.standard_normal((6, 3)), "ph": RNG.standard_normal((6, 2))}
    logits["ph"][3, 1] = np.nan
    with pytest.raises(NonFinitePrediction, match="stay 's3': prediction prob_ph_1 is nan"):
        predictions_table(_pred(logits, {}), SPEC)
