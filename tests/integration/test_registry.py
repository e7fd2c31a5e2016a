"""Champion/challenger promotion against a real MLflow registry (SQLite in a temp dir)."""

from __future__ import annotations

import math

import mlflow
import pytest

from pipelines.register import champion, decide, promote

NAME = "fusemoe-test"
METRIC = "eval_val_auroc_ihm"
CFG = {"min_improvement": 0.01, "max_ece": 0.2}


@pytest.fixture()
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    c = mlflow.MlflowClient()
    c.create_registered_model(NAME)
    return c


def new_version(client, auroc: float, ece: float = 0.05) -> str:
    """A crafted run with the given validation metrics, registered as a new version."""
    with mlflow.start_run() as run:
        mlflow.log_metric(METRIC, auroc)
        mlflow.log_metric("eval_val_ece_ihm", ece)
        mlflow.log_text("weights", "model/placeholder.txt")
    source = f"{run.info.artifact_uri}/model"
    return client.create_model_version(NAME, source, run_id=run.info.run_id).version


def test_first_model_becomes_champion(client):
    v1 = new_version(client, 0.80)
    assert promote(client, NAME, v1, METRIC, CFG).promote
    assert champion(client, NAME).version == v1


def test_worse_model_never_becomes_champion(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.79)
    decision = promote(client, NAME, v2, METRIC, CFG)
    assert not decision.promote
    assert champion(client, NAME).version == v1
    assert client.get_model_version(NAME, v2).tags["promotion_decision"] == "challenger"


def test_improvement_below_margin_is_not_enough(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.805)
    assert not promote(client, NAME, v2, METRIC, CFG).promote
    assert champion(client, NAME).version == v1


def test_better_model_takes_champion_and_keeps_previous_for_rollback(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.85)
    assert promote(client, NAME, v2, METRIC, CFG).promote
    assert champion(client, NAME).version == v2
    assert client.get_model_version_by_alias(NAME, "previous_champion").version == v1


def test_nan_metric_never_promoted_even_without_champion(client):
    v1 = new_version(client, math.nan)
    assert not promote(client, NAME, v1, METRIC, CFG).promote
    assert champion(client, NAME) is None


def test_badly_calibrated_model_fails_the_sanity_gate(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.95, ece=0.4)
    decision = promote(client, NAME, v2, METRIC, CFG)
    assert not decision.promote and "calibration" in decision.reason
    assert champion(client, NAME).version == v1


def test_force_promotes_and_says_so(client):
    v1 = new_version(client, 0.80)
    promote(client, NAME, v1, METRIC, CFG)
    v2 = new_version(client, 0.70)
    decision = promote(client, NAME, v2, METRIC, CFG, force=True)
    assert decision.promote and decision.reason.startswith("forced")
    assert champion(client, NAME).version == v2


def test_decide_requires_strict_improvement_over_margin():
    assert not decide(0.81, 0.05, 0.80, 0.01, 0.2).promote
    assert decide(0.8101, 0.05, 0.80, 0.01, 0.2).promote
