"""Ray Tune search over FuseMoE's routing knobs: experts, top-K, entropy weight, gate (and lr).

Optuna (TPE) proposes configurations, ASHA stops weak trials after `grace_period` epochs on the
validation metric. Each trial trains through the same loop as the train stage (fusemoe.loop):
in the trial's own process with a one-rank group when `tune.trial_workers` is 1 (the default: no
extra actors, per-epoch checkpoints go straight to Tune), or as a TorchTrainer of
`trial_workers` ranks driven by a trial that reserves almost no CPU. The experiment lives under
`ray.storage_path/<name>`; running again with the same name restores it (Tuner.restore), so an
interrupted search continues with no trial lost or repeated. A driver-side callback mirrors every
trial into an MLflow child run of the search's parent run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusemoe.metrics import best_index, metric_mode
from fusemoe.nn.gates import GATE_TYPES
from ray_jobs import storage

COMPLETE_MARKER = "COMPLETE"
# Progress is counted in the training loop's epochs, not Tune's training_iteration: a restored
# multi-worker trial restarts Tune's count while its TorchTrainer resumes from its own checkpoint.
EPOCH = "epoch"
PARENT_RUN_FILE = "mlflow_parent_run_id"
MODEL_KNOBS = ("num_experts", "top_k", "entropy_weight", "gate")
TRAIN_KNOBS = ("lr",)
# Metric keys of the training loop that are mirrored to MLflow (Tune adds its own bookkeeping keys).
_LOGGED_PREFIXES = ("train_", "val_", "routing_", "samples_per_s", "epoch_s")


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial finished; running it again resumes it."""


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # one row per trial: config, status, epochs, best metric
    best: dict[str, Any]  # the row of the best trial
    wall_s: float
    experiment_dir: str  # a path or a pyarrow URI (ray.storage_path/<name>)
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- search space (pure, no Ray)


def _values(name: str, spec: Any) -> list:
    """Every value a knob can take: a list is categorical, a {low, high} range contributes its ends."""
    if isinstance(spec, dict):
        missing = {"low", "high"} - set(spec)
        if missing:
            raise ValueError(f"tune.{name}: a range needs low and high (missing {sorted(missing)})")
        return [spec["low"], spec["high"]]
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise ValueError(f"tune.{name}: empty list")
    return values


def validate_space(tp: dict) -> None:
    """Rejects a search space that cannot train, naming every problem, before Ray starts."""
    problems: list[str] = []
    for key in (*MODEL_KNOBS, "num_samples", "max_epochs"):
        if key not in tp:
            problems.append(f"tune.{key} is missing")
    if problems:
        raise ValueError("invalid tune search space: " + "; ".join(problems))
    try:
        experts = [int(e) for e in _values("num_experts", tp["num_experts"])]
        top_k = [int(k) for k in _values("top_k", tp["top_k"])]
        weights = [float(w) for w in _values("entropy_weight", tp["entropy_weight"])]
        gates = [str(g) for g in _values("gate", tp["gate"])]
        lrs = [float(x) for x in _values("lr", tp.get("lr", [1e-3]))]
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid tune search space: {e}") from e
    if any(e < 1 for e in experts):
        problems.append(f"tune.num_experts must be >= 1 (got {experts})")
    if any(k < 1 for k in top_k):
        problems.append(f"tune.top_k must be >= 1 (got {top_k})")
    bad_pairs = [(e, k) for e in experts for k in top_k if k > e]
    if bad_pairs:
        pairs = ", ".join(f"num_experts={e} with top_k={k}" for e, k in bad_pairs)
        problems.append(
            f"top_k > num_experts for {pairs}; every top_k must be <= min(num_experts) = {min(experts)}"
        )
    if any(w < 0 for w in weights):
        problems.append(f"tune.entropy_weight must be >= 0 (got {[w for w in weights if w < 0]})")
    spec = tp["entropy_weight"]
    if isinstance(spec, dict) and spec.get("log") and min(weights) <= 0:
        problems.append(
            "tune.entropy_weight: a log range needs low > 0 (list 0.0 explicitly instead)"
        )
    unknown = [g for g in gates if g not in GATE_TYPES]
    if unknown:
        problems.append(f"tune.gate: unknown gate(s) {unknown}; use {', '.join(GATE_TYPES)}")
    if any(x <= 0 for x in lrs):
        problems.append(f"tune.lr must be > 0 (got {lrs})")
    if int(tp["num_samples"]) < 1 or int(tp["max_epochs"]) < 1:
        problems.append("tune.num_samples and tune.max_epochs must be >= 1")
    if problems:
        raise ValueError("invalid tune search space: " + "; ".join(problems))


def search_space(tp: dict) -> dict:
    """Tune domains: lists are categorical, {low, high, log} are (log-)uniform ranges."""
    from ray import tune

    def domain(spec: Any):
        if isinstance(spec, dict):
            lo, hi = float(spec["low"]), float(spec["high"])
            return tune.loguniform(lo, hi) if spec.get("log") else tune.uniform(lo, hi)
        return tune.choice(spec if isinstance(spec, list) else [spec])

    return {k: domain(spec) for k, spec in _knob_specs(tp).items()}


def _knob_specs(tp: dict) -> dict:
    """Every searched knob's spec from the tune section (lr defaults to a fixed 1e-3)."""
    return {k: tp[k] for k in MODEL_KNOBS} | {"lr": tp.get("lr", [1e-3])}


def _in_domain(name: str, value: Any, spec: Any) -> bool:
    if isinstance(spec, dict):
        return float(spec["low"]) <= float(value) <= float(spec["high"])
    return value in _values(name, spec)


def starting_point(params: dict) -> dict | None:
    """params.yaml's own model/train values as the search's first trial, if the space holds them.

    So the search never prefers a configuration that its own proxy (few epochs, capped train
    set) rates below the one the user wrote down; None when any value lies outside the space.
    """
    specs = _knob_specs(params["tune"])
    point = {k: params["model"].get(k) for k in MODEL_KNOBS} | {"lr": params["train"].get("lr")}
    if any(v is None or not _in_domain(k, v, specs[k]) for k, v in point.items()):
        return None
    return {k: float(v) if isinstance(specs[k], dict) else v for k, v in point.items()}


def trial_train_config(base: dict, sample: dict) -> dict:
    """fusemoe.loop's cfg for one trial: the base sections with the sampled knobs and tune budget."""
    tp = base["tune"]
    model = {**base["model"], **{k: sample[k] for k in MODEL_KNOBS}}
    train = {
        **base["train"],
        "lr": float(sample["lr"]),
        "epochs": int(tp["max_epochs"]),
        "max_train_stays": int(tp.get("max_train_stays", base["train"].get("max_train_stays", 0))),
    }
    deepspeed = dict(base["deepspeed"])
    if int(tp.get("trial_workers", 1)) <= 1:
        deepspeed["ep_size"] = 1  # one rank holds every expert
    return {
        "data_dir": base["data_dir"],
        "model": model,
        "train": train,
        "deepspeed": deepspeed,
        "use_gpu": bool(base["ray"].get("use_gpu", False)),
    }


# ---------------------------------------------------------------- trials (run inside Ray)


def _trial(sample: dict, base: dict) -> None:
    """One Tune trial; reports every epoch's metrics (and a checkpoint) to Tune."""
    from ray import tune

    cfg = trial_train_config(base, sample)
    if int(base["tune"].get("trial_workers", 1)) > 1:
        _trial_torch_trainer(cfg, base)
        return

    import torch

    from fusemoe import loop as training_loop

    torch.set_num_threads(max(1, int(base["tune"].get("cpus_per_trial", 1))))

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        training_loop.train(cfg, report)
        return
    with checkpoint.as_directory() as restore_dir:
        training_loop.train(cfg, report, Path(restore_dir))


def _trial_torch_trainer(cfg: dict, base: dict) -> None:
    """A multi-rank trial: a TorchTrainer whose rank-0 reports are forwarded to this Tune trial."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train import _worker

    rp = base["ray"]
    use_gpu = bool(rp.get("use_gpu", False))
    resources = {"CPU": float(rp.get("cpus_per_worker", 1))} | ({"GPU": 1.0} if use_gpu else {})
    trainer = TorchTrainer(
        _worker,
        train_loop_config=cfg | {"mlflow_run_id": None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=int(base["tune"]["trial_workers"]),
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            # Same name on a restored trial, so the TorchTrainer resumes from its checkpoint.
            name=f"{base['experiment']}-{tune.get_context().get_trial_id()}",
            storage_path=storage.join(storage.resolve(rp["storage_path"]), "tune-trials"),
            failure_config=FailureConfig(max_failures=int(rp.get("max_failures", 1))),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


# ---------------------------------------------------------------- MLflow mirror (driver side)


def _mlflow_callback(tracking_uri: str, parent_run_id: str, max_epochs: int):
    """A Tune callback mirroring trials into nested MLflow runs (one child per trial).

    It runs in the driver, so trial processes never talk to MLflow, and finds a trial's child run
    by tag on restore instead of creating a second one.
    """
    from ray import tune

    class MlflowTrialRuns(tune.Callback):
        def __init__(self) -> None:
            self.tracking_uri, self.parent_run_id, self.max_epochs = (
                tracking_uri,
                parent_run_id,
                max_epochs,
            )
            self._client = None
            self._runs: dict[str, str] = {}

        def __getstate__(self) -> dict:  # pickled into the experiment state for Tuner.restore
            return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_runs")}

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state, _client=None, _runs={})

        def _child(self, trial) -> str:
            import mlflow

            if self._client is None:
                self._client = mlflow.MlflowClient(self.tracking_uri)
            if trial.trial_id in self._runs:
                return self._runs[trial.trial_id]
            client = self._client
            experiment_id = client.get_run(self.parent_run_id).info.experiment_id
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.ray_trial_id = '{trial.trial_id}' and "
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            )
            if found:
                run_id = found[0].info.run_id
            else:
                run = client.create_run(
                    experiment_id,
                    run_name=f"trial-{trial.trial_id}",
                    tags={"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial.trial_id},
                )
                run_id = run.info.run_id
                for k in (*MODEL_KNOBS, *TRAIN_KNOBS):
                    client.log_param(run_id, k, trial.config[k])
            self._runs[trial.trial_id] = run_id
            return run_id

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._child(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            import time

            from mlflow.entities import Metric

            run_id = self._child(trial)
            step, now = int(result.get(EPOCH, 0)), int(time.time() * 1000)
            metrics = [
                Metric(k, float(v), now, step)
                for k, v in result.items()
                if k.startswith(_LOGGED_PREFIXES) and isinstance(v, int | float)
            ]
            self._client.log_batch(run_id, metrics=metrics)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            epochs = int((trial.last_result or {}).get(EPOCH, 0))
            run_id = self._child(trial)
            self._client.set_tag(run_id, "stopped_early", str(epochs < self.max_epochs).lower())
            self._client.set_terminated(run_id, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            run_id = self._child(trial)
            self._client.set_tag(run_id, "error", str(trial.error_file or "trial failed")[:500])
            self._client.set_terminated(run_id, "FAILED")

    return MlflowTrialRuns()


# ---------------------------------------------------------------- the search


def experiment_dir(params: dict, name: str, fresh_if_complete: bool = True) -> str:
    """Where the search lives (path or URI); a finished search with the same name starts over."""
    path = storage.join(storage.resolve(params["ray"]["storage_path"]), name)
    if fresh_if_complete and storage.exists(storage.join(path, COMPLETE_MARKER)):
        storage.delete_dir(path)
    return path


def run_search(
    params: dict,
    data_dir: str | Path,
    name: str,
    tracking_uri: str,
    parent_run_id: str,
    callbacks: tuple = (),
) -> SearchResult:
    """Runs (or resumes) the search; raises SearchInterrupted if it stops before every trial ends.

    `params` holds the params.yaml sections model, train, deepspeed, ray and tune; `data_dir`
    is a path or a pyarrow URI that every trial can read (storage.dataset_uri).
    """
    import time

    from ray import tune

    from ray_jobs.train import init_ray

    tp, metric = params["tune"], params["train"]["primary_metric"]
    validate_space(tp)
    storage.require_reachable_tracking(tracking_uri, storage.cluster_address(params["ray"]))
    path = experiment_dir(params, name, fresh_if_complete=False)
    init_ray(params["ray"])
    base = {k: params[k] for k in ("model", "train", "deepspeed", "ray", "tune")}
    base["data_dir"], base["experiment"] = storage.resolve(data_dir), name
    workers = int(tp.get("trial_workers", 1))
    if workers > 1:  # the trial only drives a TorchTrainer whose workers hold the CPUs
        resources = _driver_trial_resources()
        _check_capacity(
            workers * float(params["ray"].get("cpus_per_worker", 1)) + resources.get("CPU", 0.0)
        )
    else:
        resources = {"CPU": float(tp.get("cpus_per_trial", 1))}
        if params["ray"].get("use_gpu", False):
            resources["GPU"] = 1.0
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base), resources)

    t0 = time.perf_counter()
    if tune.Tuner.can_restore(path):
        print(f"tune: resuming the interrupted search in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        max_epochs = int(tp["max_epochs"])
        start = starting_point(params)
        print(
            f"tune: first trial = params.yaml's configuration {start}"
            if start
            else "tune: params.yaml's configuration lies outside the search space; not tried"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tp),
            tune_config=tune_config(tp, metric, start),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage.resolve(params["ray"]["storage_path"]),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_mlflow_callback(tracking_uri, parent_run_id, max_epochs), *callbacks],
            ),
        )
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    # A trial is finished when it errored or its last result says done (it returned, or ASHA
    # stopped it). One that an interruption stopped mid-run also ends up TERMINATED, but
    # without done: it resumes from its checkpoint when the search is run again.
    finished = sum(r.error is not None or bool((r.metrics or {}).get("done")) for r in grid)
    if len(grid) < int(tp["num_samples"]) or finished < len(grid):
        raise SearchInterrupted(
            f"search {name} stopped with {finished} of {tp['num_samples']} trials finished; "
            "run the same command again to resume it"
        )
    rows = [_trial_row(r, metric, int(tp["max_epochs"])) for r in grid]
    ok = [r for r in rows if r["status"] != "failed"]
    if not ok:
        raise RuntimeError(f"every trial of search {name} failed; first error: {rows[0]['error']}")
    best = best_trial(ok, metric)
    counts = {
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
        "failed": len(rows) - len(ok),
    }
    storage.write_text(storage.join(path, COMPLETE_MARKER), "done\n")
    return SearchResult(trials=rows, best=best, wall_s=wall, experiment_dir=path, counts=counts)


def tune_config(tp: dict, metric: str, start: dict | None):
    """The search's TuneConfig: Optuna proposes, ASHA stops, both in ``metric``'s direction."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    max_epochs = int(tp["max_epochs"])
    return tune.TuneConfig(
        metric=metric,
        mode=metric_mode(metric),  # the searcher and the scheduler take the direction from here
        search_alg=OptunaSearch(
            seed=int(tp.get("seed", 0)), points_to_evaluate=[start] if start else None
        ),
        scheduler=ASHAScheduler(
            time_attr=EPOCH,
            max_t=max_epochs,
            grace_period=min(int(tp.get("grace_period", 1)), max_epochs),
            reduction_factor=float(tp.get("reduction_factor", 2)),
        ),
        num_samples=int(tp["num_samples"]),
        max_concurrent_trials=int(tp.get("max_concurrent_trials", 1)),
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        # A fresh process per trial: a wrapped function trainable cannot be reset for reuse
        # in Ray 2.60 (every other trial errors), and no DeepSpeed state leaks between trials.
        reuse_actors=False,
    )


DRIVER_RESOURCE = "TRAIN_DRIVER"


def _driver_trial_resources() -> dict[str, float]:
    """What a trial that only drives a TorchTrainer reserves (Ray 2.60 refuses ``{"CPU": 0}``).

    On a cluster whose head offers the custom ``TRAIN_DRIVER`` resource (and no CPUs), the trial,
    and with it its Train controller, runs on the head and leaves every worker CPU to the
    trainers; elsewhere it takes a hundredth of a CPU.
    """
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        return {DRIVER_RESOURCE: 0.01}
    return {"CPU": 0.01}


def _check_capacity(cpus: float) -> None:
    """A trial that can never be scheduled would leave Tune waiting forever: fail instead."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if cpus > total:
        raise ValueError(
            f"a TorchTrainer trial needs {cpus:g} CPUs (tune.trial_workers x ray.cpus_per_worker, "
            f"+ 0.01 for the trial without a {DRIVER_RESOURCE} resource) but Ray has {total:g}; "
            "lower ray.cpus_per_worker or raise ray.num_cpus"
        )


def _trial_row(result, metric: str, max_epochs: int) -> dict[str, Any]:
    """A trial's summary; its score is its best epoch's metric (as the train stage picks epochs)."""
    df = result.metrics_dataframe
    has_metric = df is not None and metric in df and df[metric].notna().any()
    epochs = int(df[EPOCH].max()) if has_metric else 0
    if result.error is not None or not has_metric:
        status = "failed"
    else:
        status = "completed" if epochs >= max_epochs else "stopped_early"
    best = best_index(df[metric].tolist(), metric) if has_metric else None
    return {
        "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
        **{k: result.config[k] for k in (*MODEL_KNOBS, *TRAIN_KNOBS)},
        "status": status,
        "epochs": epochs,
        "best_metric": float(df[metric].iloc[best]) if has_metric else float("nan"),
        "best_epoch": int(df[EPOCH].iloc[best]) if has_metric else 0,
        "error": None if result.error is None else str(result.error)[:500],
    }


def best_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The trial row whose best epoch is best on ``metric``, in the metric's direction."""
    return rows[best_index([r["best_metric"] for r in rows], metric)]
