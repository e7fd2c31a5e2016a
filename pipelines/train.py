"""DVC stage `train`: Ray Train + DeepSpeed fit, tracked in one MLflow run.

Outs: models/train/ (best-on-validation weights, model config, run.json lineage) and
metrics/train_history.json (per-epoch curves for `dvc plots`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipelines.common import (
    BEST_PARAMS,
    HISTORY_FILE,
    RUN_FILE,
    TRAIN_DIR,
    apply_best_params,
    config_hash,
    data_hash,
    flatten,
    git_sha,
    load_params,
    replace_dir,
    skip_final_gc,
    stage_args,
    tracking_uri,
    write_json_atomic,
)

SECTIONS = ("data", "model", "train", "deepspeed", "ray", "mlflow")


def mlflow_run_for(params: dict, run_name: str, data_dir: Path, dhash: str, ray_dir: str) -> str:
    """The MLflow run of this Ray run: reused when resuming an unfinished run, created otherwise
    (a finished Ray run is trained afresh, so each training gets its own run and model version)."""
    import mlflow
    import pandas as pd

    from ray_jobs import storage
    from ray_jobs.train import COMPLETE_MARKER

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    mlflow.set_experiment(params["mlflow"]["experiment"])
    id_file = storage.join(ray_dir, "mlflow_run_id")
    if storage.exists(storage.join(ray_dir, COMPLETE_MARKER)):
        storage.delete_dir(ray_dir)  # a finished run of this configuration: train it afresh
    if storage.exists(id_file):
        return storage.read_text(id_file).strip()
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flatten({k: params[k] for k in ("model", "train", "deepspeed", "ray")}))
        mlflow.set_tags(
            {
                "git_sha": git_sha(),
                "data_hash": dhash,
                "ray_run": run_name,
                "data_source": params["data"]["source"],
                "params_source": "params.yaml + " + str(BEST_PARAMS)
                if params["train"].get("use_best_params")
                else "params.yaml",
            }
        )
        stays = pd.read_parquet(data_dir / "stays.parquet")
        dataset = mlflow.data.from_pandas(
            stays, source=str(data_dir), name=params["data"]["source"], digest=dhash[:16]
        )
        mlflow.log_input(dataset, context="training")
        mlflow.log_dict(json.loads((data_dir / "manifest.json").read_text()), "data/manifest.json")
    storage.write_text(id_file, run.info.run_id)
    return run.info.run_id


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
    skip_final_gc()
    params = apply_best_params(load_params(args.params, SECTIONS))
    from fusemoe.parallel.engine import deepspeed_config, per_rank_batch
    from ray_jobs import storage
    from ray_jobs.train import run_training

    try:
        storage.require_reachable_tracking(
            tracking_uri(params["mlflow"]), storage.cluster_address(params["ray"])
        )
    except ValueError as e:
        sys.exit(f"error: {e}")

    data_dir = Path(params["data"]["out_dir"])
    if not (data_dir / "manifest.json").is_file():
        sys.exit(f"error: {data_dir}/manifest.json not found: run the prepare stage first")
    dhash = data_hash(data_dir)
    fingerprint = config_hash(
        {k: params[k] for k in ("model", "train", "deepspeed")} | {"data": dhash}
    )
    run_name = f"{params['train']['run_name']}-{fingerprint}"
    storage_path = storage.resolve(params["ray"]["storage_path"])
    ray_dir = storage.join(storage_path, run_name)
    run_id = mlflow_run_for(params, run_name, data_dir, dhash, ray_dir)

    import mlflow

    ds = deepspeed_config(
        params["deepspeed"],
        micro_batch_size=per_rank_batch(
            int(params["train"]["batch_size"]), int(params["ray"]["num_workers"])
        ),
        lr=float(params["train"]["lr"]),
        weight_decay=float(params["train"]["weight_decay"]),
    )
    mlflow.log_dict(ds, "deepspeed_config.json", run_id=run_id)

    t0 = time.perf_counter()
    best_dir, best_metrics, history = run_training(
        params,
        storage.dataset_uri(data_dir, storage_path, dhash),
        run_name,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri(params["mlflow"]),
    )
    wall = time.perf_counter() - t0

    TRAIN_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".train-", dir=TRAIN_DIR.parent)) / "out"
    shutil.copytree(best_dir / "model", staging)
    if storage.is_remote(storage_path):
        shutil.rmtree(best_dir.parent, ignore_errors=True)  # the downloaded checkpoint
    run_info = {
        "mlflow_run_id": run_id,
        "ray_run": run_name,
        "ray_checkpoint": storage.join(ray_dir, best_dir.name),
        "git_sha": git_sha(),
        "data_hash": dhash,
        "best_epoch": int(best_metrics["epoch"]),
        "best_metrics": best_metrics,
        "train_wall_s": wall,
    }
    (staging / RUN_FILE.name).write_text(json.dumps(run_info, indent=2, default=float))
    replace_dir(staging, TRAIN_DIR)
    shutil.rmtree(staging.parent, ignore_errors=True)
    write_json_atomic(HISTORY_FILE, history)
    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "best_epoch", str(run_info["best_epoch"]))
    client.log_metric(run_id, "train_wall_s", wall)
    primary = params["train"]["primary_metric"]
    print(
        f"train: best epoch {run_info['best_epoch']} {primary} "
        f"{best_metrics.get(primary, float('nan')):.4f} in {wall:.0f}s; MLflow run {run_id}"
    )


if __name__ == "__main__":
    main()
