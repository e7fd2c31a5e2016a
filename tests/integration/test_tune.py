"""The tune stage on real Ray Tune, Optuna, ASHA and MLflow (SQLite), with tiny synthetic data.

One search of 2 trials is interrupted after its first trial (SIGUSR1, Tune's graceful stop) and
run again, which must resume it; the tests then check what that search left behind. One Ray
session serves the module (its start-up dominates the run time on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 2
STARTING_POINT = {
    "model": {"num_experts": 4, "top_k": 2, "entropy_weight": 0.1, "gate": "laplace"},
    "train": {"lr": 0.005},
}


def tiny_params(tmp: Path, data_dir: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(out_dir=str(data_dir), source="synthetic")
    params["model"].update(d_model=16, n_heads=2, n_layers=1, num_ref_points=4, expert_hidden=32)
    # Inside the space below, so the search's first trial is exactly this configuration.
    params["model"].update(STARTING_POINT["model"])
    params["train"].update(batch_size=32, tasks=["ihm"], primary_metric="val_auroc_ihm")
    params["train"].update(STARTING_POINT["train"])
    params["ray"].update(storage_path=str(tmp / "ray"), num_cpus=2)
    params["mlflow"].update(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="tune-it")
    params["tune"].update(
        num_samples=NUM_SAMPLES,
        max_epochs=2,
        max_train_stays=0,
        num_experts=[2, 4],
        top_k=[1, 2],
        entropy_weight=[0.0, 0.1],
        gate=["softmax", "laplace"],
        lr={"low": 1e-3, "high": 1e-2, "log": True},
    )
    return params


def interrupt_after_first_trial(marker: Path):
    """Stops the search like Ctrl-C once, after a trial finishes (Tune pickles callbacks, so the
    restored search carries it too: the marker file keeps it to one interruption)."""
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)

    return Interrupt()


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """An interrupted search, resumed; yields what both runs produced."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tmp_path_factory.mktemp("tune")
    from fusemoe.data.synthetic import write_synthetic

    data_dir = tmp / "data"
    write_synthetic(data_dir, num_stays=200, seed=3)
    params = tiny_params(tmp, data_dir)

    import ray

    from pipelines.tune import run_stage
    from ray_jobs.tune import SearchInterrupted

    marker = tmp / "interrupted_trial"
    out = {"best": tmp / "best_params.yaml", "metrics": tmp / "tune.json"}
    try:
        with pytest.raises(SearchInterrupted, match="run the same command again"):
            run_stage(params, out["best"], out["metrics"], (interrupt_after_first_trial(marker),))
        assert not out["best"].exists()
        summary = run_stage(params, out["best"], out["metrics"])
        yield {"tmp": tmp, "params": params, "summary": summary, "marker": marker, **out}
    finally:
        ray.shutdown()


def child_runs(search) -> tuple:
    import mlflow

    client = mlflow.MlflowClient(search["params"]["mlflow"]["tracking_uri"])
    parent = client.get_run(search["summary"]["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    return client, parent, children


def test_search_writes_best_params_and_metrics(search):
    best = yaml.safe_load(search["best"].read_text())
    assert set(best["model"]) == {"num_experts", "top_k", "entropy_weight", "gate"}
    assert best["model"]["top_k"] <= best["model"]["num_experts"]
    assert best["model"]["gate"] in ("softmax", "laplace")
    summary = json.loads(search["metrics"].read_text())
    assert summary["trials"] == NUM_SAMPLES
    assert summary["completed"] + summary["stopped_early"] + summary["failed"] == NUM_SAMPLES
    assert summary["failed"] == 0
    assert summary["completed"] >= 1  # the first trial always reaches max_epochs
    assert 0.0 <= summary["best_val_metric"] <= 1.0 and summary["wall_s"] > 0
    assert summary["best_config"] == {f"{s}.{k}": v for s, d in best.items() for k, v in d.items()}


def test_best_trial_is_the_argmax_of_the_validation_metric(search):
    client, _, children = child_runs(search)
    scores = {
        run.data.tags["ray_trial_id"]: max(
            m.value for m in client.get_metric_history(run.info.run_id, "val_auroc_ihm")
        )
        for run in children
    }
    best_id = max(scores, key=scores.get)
    assert search["summary"]["best_trial_id"] == best_id
    assert search["summary"]["best_val_metric"] == pytest.approx(scores[best_id])
    best_child = next(r for r in children if r.data.tags["ray_trial_id"] == best_id)
    best = yaml.safe_load(search["best"].read_text())
    assert int(best_child.data.params["num_experts"]) == best["model"]["num_experts"]
    assert best_child.data.params["gate"] == best["model"]["gate"]


def test_mlflow_has_a_parent_run_with_one_child_per_trial(search):
    client, parent, children = child_runs(search)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.num_samples"] == str(NUM_SAMPLES)
    assert "best.model.num_experts" in parent.data.params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {
        "tune/trials.csv",
        "tune/metric_vs_knobs.png",
        "tune/parallel_coordinates.png",
    } <= artifacts
    assert len(children) == NUM_SAMPLES
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"num_experts", "top_k", "entropy_weight", "gate", "lr"} <= set(run.data.params)
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_auroc_ihm")]
        assert epochs == sorted(set(epochs)) and 1 <= len(epochs) <= 2
        assert any(k.startswith("routing_") for k in run.data.metrics)


def test_first_trial_is_the_params_yaml_configuration(search):
    client, _, children = child_runs(search)
    first = min(children, key=lambda r: r.info.start_time).data.params
    expected = STARTING_POINT["model"] | STARTING_POINT["train"]
    assert {k: first[k] for k in expected} == {k: str(v) for k, v in expected.items()}


def test_interrupted_search_resumes_without_losing_or_repeating_trials(search):
    client, _, children = child_runs(search)
    first = search["marker"].read_text()
    ids = [r.data.tags["ray_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == NUM_SAMPLES
    assert first in ids  # the trial finished before the interruption is kept, not re-run
    first_run = next(r for r in children if r.data.tags["ray_trial_id"] == first)
    steps = [m.step for m in client.get_metric_history(first_run.info.run_id, "val_auroc_ihm")]
    assert len(steps) == len(set(steps))


def test_a_finished_search_is_started_over_when_run_again(search):
    from ray_jobs.tune import COMPLETE_MARKER, PARENT_RUN_FILE, experiment_dir

    path = Path(search["summary"]["ray_experiment"])
    assert (path / COMPLETE_MARKER).is_file()
    assert experiment_dir(search["params"], path.name) == str(path)
    assert not (path / PARENT_RUN_FILE).exists()  # no reused MLflow parent
    assert not path.exists()  # no stale trials


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts": [2, 8], "top_k": [1, 4]}, "num_experts=2 with top_k=4"),
        ({"num_experts": [2], "top_k": [4, 8]}, "num_experts=2 with top_k=8"),
        ({"entropy_weight": [0.1, -0.5]}, "entropy_weight must be >= 0"),
        ({"gate": ["softmax", "cosine"]}, "unknown gate(s) ['cosine']"),
    ],
)
def test_invalid_space_fails_fast_with_a_clear_message(tmp_path, change, message):
    import ray

    from pipelines.tune import run_stage

    params = tiny_params(tmp_path, tmp_path / "no-data-needed")
    params["tune"].update(change)
    was_running = ray.is_initialized()
    with pytest.raises(ValueError, match="invalid tune search space") as err:
        run_stage(params, tmp_path / "best.yaml", tmp_path / "tune.json")
    assert message in str(err.value)
    assert ray.is_initialized() == was_running  # nothing started
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
