"""Ray Train job: a TorchTrainer whose workers run the FuseMoE DeepSpeed loop of fusemoe.loop.

Local by default (an embedded Ray on 127.0.0.1); set RAY_ADDRESS (or params `ray.address`) to run
on a cluster. The Ray run is named after a hash of the configuration, so re-running an interrupted
job with the same configuration resumes from its last checkpoint instead of starting over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from fusemoe import loop as training_loop
from fusemoe.metrics import best_index, metric_mode
from ray_jobs import storage

COMPLETE_MARKER = "COMPLETE"

# fusemoe.loop.train's signature: (cfg, report, restore_dir) -> {"metrics", "history"}.
TrainFn = Callable[..., dict]


def init_ray(ray_params: dict) -> None:
    """Connects to RAY_ADDRESS / ray.address, or starts a local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    address = storage.cluster_address(ray_params)
    # A busy 2-core laptop can take over a minute to register the local raylet (default 60 s).
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    # Ray Train's print patch sends each worker print both to stdout and to a logger that also
    # writes to the console, so the driver showed every progress line twice; plain print: once.
    env = {
        "env_vars": {
            "DVC_NO_ANALYTICS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        }
    }
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=int(ray_params.get("num_cpus", 2)),
            # The dashboard hosts the state API that Ray Train's controller polls; loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            runtime_env=env,
            log_to_driver=True,
        )


def _worker(config: dict, train_fn: TrainFn = training_loop.train) -> dict:
    """Runs on every Ray Train worker; rank 0 alone talks to MLflow."""
    rank = ray.train.get_context().get_world_rank()
    mlflow_run = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow_run = mlflow.start_run(
            run_id=config["mlflow_run_id"], log_system_metrics=config.get("system_metrics", True)
        )

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        if mlflow_run is not None:
            import mlflow

            step = int(metrics["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step=step)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))

    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return train_fn(config, report)
        with checkpoint.as_directory() as restore_dir:
            return train_fn(config, report, Path(restore_dir))
    finally:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run()


def best_checkpoint(
    checkpoints: list[tuple[Checkpoint, dict]], metric: str
) -> tuple[Checkpoint, dict]:
    """The kept (checkpoint, metrics) pair that is best on ``metric``, in its direction."""
    return checkpoints[best_index([m.get(metric) for _, m in checkpoints], metric)]


def run_training(
    params: dict,
    data_dir: str | Path,
    run_name: str,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    train_fn: TrainFn | None = None,
) -> tuple[Path, dict, list[dict]]:
    """Fits the model; returns (best checkpoint dir, its metrics, every epoch's metrics).

    `params` holds the params.yaml sections model, train, deepspeed, ray. `data_dir` is a path
    or a pyarrow URI that every worker can read (storage.dataset_uri). `train_fn` replaces
    fusemoe.loop.train on the workers (same signature); tests use it to inject failures. With
    remote storage the best checkpoint is downloaded to a local temporary directory.
    """
    rp, tp = params["ray"], params["train"]
    if mlflow_run_id:
        storage.require_reachable_tracking(tracking_uri or "", storage.cluster_address(rp))
    storage_path = storage.resolve(rp["storage_path"])
    run_dir = storage.join(storage_path, run_name)
    if storage.exists(storage.join(run_dir, COMPLETE_MARKER)):
        # A finished run with this exact configuration: train again from scratch (deterministic).
        storage.delete_dir(run_dir)
    init_ray(rp)
    use_gpu = bool(rp.get("use_gpu", False))
    config = {
        "data_dir": storage.resolve(data_dir),
        "model": params["model"],
        "train": tp,
        "deepspeed": params["deepspeed"],
        "use_gpu": use_gpu,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "system_metrics": bool(params.get("mlflow", {}).get("system_metrics", True)),
    }
    resources = {"CPU": float(rp.get("cpus_per_worker", 1))}
    if use_gpu:
        resources["GPU"] = 1.0
    primary = tp["primary_metric"]
    loop = _worker if train_fn is None else (lambda cfg: _worker(cfg, train_fn))
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=int(rp["num_workers"]), use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(rp.get("keep_checkpoints", 2)),
                checkpoint_score_attribute=primary,
                checkpoint_score_order=metric_mode(primary),
            ),
            failure_config=FailureConfig(max_failures=int(rp.get("max_failures", 1))),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if not result.best_checkpoints:
        raise RuntimeError(f"Ray run {run_name} finished without a checkpoint in {run_dir}")
    checkpoint, metrics = best_checkpoint(result.best_checkpoints, primary)
    history = (
        list(result.return_value.get("history", []))
        if isinstance(result.return_value, dict)
        else []
    )
    storage.write_text(storage.join(run_dir, COMPLETE_MARKER), "done\n")
    if storage.is_remote(storage_path):
        local = Path(tempfile.mkdtemp(prefix="fusemoe-ckpt-")) / Path(checkpoint.path).name
        return Path(checkpoint.to_directory(str(local))), metrics, history
    return Path(checkpoint.path), metrics, history
