"""DVC stage `tune`: Ray Tune search (Optuna + ASHA) over experts, top-K, entropy weight and gate.

Outs: best_params.yaml (the best trial's model/train values; the train stage lays them over
params.yaml while `train.use_best_params` is on) and metrics/tune.json (wall time, trial outcomes,
best config and val metric). MLflow: one parent run for the search, one nested child run per trial.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

from fusemoe.metrics import metric_mode
from pipelines.common import (
    BEST_PARAMS,
    config_hash,
    data_hash,
    flatten,
    git_sha,
    load_params,
    skip_final_gc,
    stage_args,
    tracking_uri,
    write_json_atomic,
)

METRICS = Path("metrics/tune.json")
SECTIONS = ("data", "model", "train", "deepspeed", "ray", "tune", "mlflow")


def parent_run(params: dict, name: str, exp_dir: str, dhash: str) -> str:
    """The search's MLflow run: reused when resuming an interrupted search, created otherwise."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    experiment = mlflow.set_experiment(params["mlflow"]["experiment"])
    from ray_jobs import storage
    from ray_jobs.tune import PARENT_RUN_FILE

    id_file = storage.join(exp_dir, PARENT_RUN_FILE)
    if storage.exists(id_file):
        return storage.read_text(id_file).strip()
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment.experiment_id,
        run_name=name,
        tags={"git_sha": git_sha(), "data_hash": dhash, "ray_run": name, "kind": "tune"},
    )
    fixed = {k: params[k] for k in ("model", "train", "tune")}
    for key, value in flatten(fixed).items():
        client.log_param(run.info.run_id, key, str(value)[:500])
    storage.write_text(id_file, run.info.run_id)
    return run.info.run_id


def best_overrides(best: dict) -> dict:
    """The best trial's values as params.yaml sections."""
    from ray_jobs.tune import MODEL_KNOBS, TRAIN_KNOBS

    def plain(v):
        return v.item() if hasattr(v, "item") else v

    return {
        "model": {k: plain(best[k]) for k in MODEL_KNOBS},
        "train": {k: plain(best[k]) for k in TRAIN_KNOBS},
    }


def log_summary(run_id: str, rows: list[dict], best: dict, metric: str, summary: dict) -> None:
    """Parent run: best config, results table and metric-vs-knob plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np
    import pandas as pd

    client = mlflow.MlflowClient()
    for k, v in flatten(best_overrides(best)).items():
        client.log_param(run_id, f"best.{k}", v)
    client.log_metric(run_id, f"best_{metric}", best["best_metric"])
    for k in ("wall_s", "trials", "completed", "stopped_early", "failed"):
        client.log_metric(run_id, k, float(summary[k]))
    table = pd.DataFrame(rows)
    ok = table[table.status != "failed"]
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        knobs = ("num_experts", "top_k", "entropy_weight", "gate", "lr")
        fig, axes = plt.subplots(1, len(knobs), figsize=(4 * len(knobs), 3.2), sharey=True)
        for ax, knob in zip(axes, knobs, strict=True):
            x = ok[knob].astype(str) if knob == "gate" else ok[knob]
            ax.scatter(x, ok.best_metric, c=ok.status.eq("completed"), cmap="coolwarm")
            ax.set_xlabel(knob)
            ax.set_xscale("log" if knob == "lr" else "linear")
        axes[0].set_ylabel(metric)
        fig.tight_layout()
        fig.savefig(Path(tmp) / "metric_vs_knobs.png", dpi=100)
        plt.close(fig)
        # Parallel coordinates: every knob scaled to [0, 1], one line per trial coloured by score.
        coded = (
            ok[["num_experts", "top_k", "entropy_weight"]]
            .astype(float)
            .assign(
                log10_lr=np.log10(ok.lr.astype(float)),
                gate=ok.gate.astype("category").cat.codes,
                best_metric=ok.best_metric,
            )
        )
        span = (coded.max() - coded.min()).replace(0, 1)
        scaled = (coded - coded.min()) / span
        fig, ax = plt.subplots(figsize=(8, 3.5))
        cmap = plt.get_cmap("viridis")
        for (_, row), score in zip(scaled.iterrows(), scaled.best_metric, strict=True):
            ax.plot(range(len(scaled.columns)), row.values, color=cmap(score), alpha=0.8)
        ax.set_xticks(range(len(scaled.columns)), list(scaled.columns))
        ax.set_title(f"trials (colour: {metric})")
        fig.tight_layout()
        fig.savefig(Path(tmp) / "parallel_coordinates.png", dpi=100)
        plt.close(fig)
        client.log_artifacts(run_id, tmp, "tune")


def run_stage(
    params: dict,
    best_params_path: Path = BEST_PARAMS,
    metrics_path: Path = METRICS,
    callbacks: tuple = (),
) -> dict:
    """Validates the space, runs or resumes the search, writes the outs; returns metrics/tune.json."""
    from ray_jobs import storage
    from ray_jobs.tune import experiment_dir, run_search, validate_space

    validate_space(params["tune"])  # before data hashing, MLflow or Ray
    uri = tracking_uri(params["mlflow"])
    storage.require_reachable_tracking(uri, storage.cluster_address(params["ray"]))
    data_dir = Path(params["data"]["out_dir"])
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{data_dir}/manifest.json not found: run the prepare stage first")
    dhash = data_hash(data_dir)
    searched = {k: params[k] for k in ("model", "train", "deepspeed", "tune")}
    name = f"{params['tune'].get('name', 'fusemoe-tune')}-{config_hash(searched | {'data': dhash})}"
    exp_dir = experiment_dir(params, name)
    run_id = parent_run(params, name, exp_dir, dhash)
    data_uri = storage.dataset_uri(data_dir, storage.resolve(params["ray"]["storage_path"]), dhash)
    result = run_search(params, data_uri, name, uri, run_id, callbacks)

    metric = params["train"]["primary_metric"]
    best = result.best
    summary = {
        "wall_s": result.wall_s,
        **result.counts,
        "metric": metric,
        "mode": metric_mode(metric),  # best = the trial with the max / min of the metric
        "best_val_metric": best["best_metric"],
        "best_epoch": best["best_epoch"],
        "best_trial_id": best["trial_id"],
        "best_config": flatten(best_overrides(best)),
        "mlflow_parent_run_id": run_id,
        "ray_experiment": str(result.experiment_dir),
    }
    header = f"# Best of tune search {name} ({metric} {best['best_metric']:.4f});\n"
    header += "# train lays these over params.yaml while train.use_best_params is true\n"
    best_params_path = Path(best_params_path)
    tmp = best_params_path.with_name(f".{best_params_path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(best_overrides(best), sort_keys=False))
    tmp.replace(best_params_path)
    write_json_atomic(metrics_path, summary)

    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    log_summary(run_id, result.trials, best, metric, summary)
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    return summary


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
    skip_final_gc()
    params = load_params(args.params, SECTIONS)
    from ray_jobs.tune import SearchInterrupted

    try:
        summary = run_stage(params)
    except (ValueError, FileNotFoundError, SearchInterrupted) as e:
        sys.exit(f"error: {e}")
    print(
        f"tune: {summary['trials']} trials ({summary['completed']} completed, "
        f"{summary['stopped_early']} stopped early by ASHA, {summary['failed']} failed) in "
        f"{summary['wall_s']:.0f}s; best {summary['metric']} {summary['best_val_metric']:.4f} "
        f"with {json.dumps(summary['best_config'])}"
    )


if __name__ == "__main__":
    main()
