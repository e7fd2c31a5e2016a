"""A driver process of the local cluster for tests/integration/test_cluster_training.py.

    python tests/integration/cluster_driver.py train|tune SPEC.json

It runs with the cluster's environment (RAY_ADDRESS, AWS_*, MLFLOW_*), which Ray reads when it is
imported, hence a process of its own rather than the pytest process. `train`: ray_jobs.train's
run_training on the dataset uploaded to the object store, through the recording train_fn of
training_runs.py; writes {metrics, history} and the best checkpoint's weights to SPEC["out"].
`tune`: pipelines.tune's run_stage, interrupted once after its first finished trial and run
again (Tuner.restore from the experiment state on the object store); writes the summary to SPEC["out"].
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def train(spec: dict) -> None:
    import torch
    from training_runs import model_weights, recording_train

    from pipelines.common import data_hash
    from ray_jobs import storage
    from ray_jobs.train import run_training

    params, out = spec["params"], Path(spec["out"])
    data_uri = storage.dataset_uri(
        spec["data_dir"],
        storage.resolve(params["ray"]["storage_path"]),
        data_hash(spec["data_dir"]),
    )
    marker = Path(spec["marker"]) if spec.get("marker") else None
    train_fn = recording_train(
        Path(spec["events"]),
        spec.get("crash_after_epoch", 0),
        marker,
        spec.get("slow_after_epoch", 0),
    )
    best_dir, metrics, history = run_training(params, data_uri, spec["name"], train_fn=train_fn)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model_weights(best_dir), out / "model.pt")
    (out / "result.json").write_text(
        json.dumps({"metrics": metrics, "history": history, "data_dir": data_uri})
    )


def interrupt_after_first_trial(marker: Path):
    """Stops the search like Ctrl-C once, after a trial finishes (the marker keeps it to once)."""
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)

    return Interrupt()


def tune(spec: dict) -> None:
    from pipelines.tune import run_stage
    from ray_jobs.tune import SearchInterrupted

    params, out = spec["params"], Path(spec["out"])
    best, metrics = out / "best_params.yaml", out / "tune.json"
    try:
        run_stage(params, best, metrics, (interrupt_after_first_trial(Path(spec["marker"])),))
    except SearchInterrupted as e:
        print(f"cluster_driver: {e}", flush=True)
    else:
        raise SystemExit("cluster_driver: the search was not interrupted")
    summary = run_stage(params, best, metrics)
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    {"train": train, "tune": tune}[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
