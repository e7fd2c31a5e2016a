"""DVC stage `register`: package the model, register it, move aliases only when it is earned.

Every new version gets the alias `challenger`. `champion` moves to it only when it beats the current
champion by `registry.min_improvement` on `registry.metric` (its direction from
fusemoe.metrics.higher_is_better), measured on the same validation data, and passes the sanity
gates (finite metric, calibration error within `registry.max_ece`); the first model becomes
champion. A champion trained on other data is re-scored on the challenger's validation split; when
that is impossible, or the champion has no value of the metric, nothing moves and the reason says
why. A training run is registered once: re-running the stage (or pointing it at the same store
under another URI) finds its version by run id instead of adding a duplicate. The decision and its
reason are tagged on the version and written to models/registry.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fusemoe.metrics import higher_is_better, is_better
from pipelines.common import (
    TRAIN_DIR,
    data_hash,
    load_params,
    read_run,
    skip_final_gc,
    stage_args,
    tracking_uri,
    write_json_atomic,
)

REGISTRY_FILE = Path("models/registry.json")
EVAL_PREFIX = "eval_"  # evaluate logs eval_<split>_<metric>_<task>; the Ray workers log val_*


@dataclass
class Decision:
    promote: bool
    reason: str
    challenger_metric: float | None
    champion_metric: float | None
    champion_version: str | None
    champion_metric_source: str | None = None  # "logged" | "re-scored on the challenger's data"


class RescoreError(ValueError):
    """A registered model cannot be scored on a validation split; says why."""


def decide(
    metric: str,
    challenger_metric: float | None,
    challenger_ece: float | None,
    champion_metric: float | None,
    min_improvement: float,
    max_ece: float,
    champion_version: str | None = None,
) -> Decision:
    """Pure promotion rule, so it can be tested without a registry. `champion_metric` None means
    there is no champion (a champion without a comparable value is refused before this)."""

    def make(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, challenger_metric, champion_metric, champion_version)

    if challenger_metric is None or not math.isfinite(challenger_metric):
        return make(False, f"challenger {metric} is not finite ({challenger_metric})")
    if challenger_ece is not None and (
        not math.isfinite(challenger_ece) or challenger_ece > max_ece
    ):
        return make(False, f"calibration gate: ECE {challenger_ece:.4f} > max_ece {max_ece}")
    if champion_metric is None:
        return make(True, "no champion yet")
    direction = "higher" if higher_is_better(metric) else "lower"
    verdict = (
        "beats"
        if is_better(challenger_metric, champion_metric, metric, min_improvement)
        else "does not beat"
    )
    challenger_s, champion_s = distinct_digits(challenger_metric, champion_metric)
    return make(
        verdict == "beats",
        f"{metric} {challenger_s} {verdict} champion {champion_s} "
        f"by more than {min_improvement} ({direction} is better)",
    )


def distinct_digits(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with at least ``digits`` decimals and as many more (up to 10) as it takes
    for unequal values to print unequally: "0.88839 beats 0.88836", never "0.8884 beats 0.8884"."""
    while a != b and digits < 10 and f"{a:.{digits}f}" == f"{b:.{digits}f}":
        digits += 1
    return f"{a:.{digits}f}", f"{b:.{digits}f}"


def champion(client, name: str):
    """The current champion version, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def run_metric(client, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return None if value is None else float(value)


def rescore(name: str, version: str, metric: str, data_dir: Path) -> float:
    """`metric` of registered `version` on the validation split of `data_dir`, computed from its
    packaged weights and manifest with the same metric functions as training and evaluate."""
    import mlflow
    import pyarrow.parquet as pq
    import torch
    from mlflow.exceptions import MlflowException
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.data.flexi import FlexiModalError
    from fusemoe.inference import predict
    from fusemoe.metrics import task_metrics

    if not metric.startswith(EVAL_PREFIX + "val_"):
        raise RescoreError(f"only validation metrics (eval_val_*) can be re-scored, not {metric}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    except (MlflowException, OSError, ImportError, AttributeError) as e:
        raise RescoreError(f"its packaged model does not load ({type(e).__name__}: {e})") from None
    stays = pq.read_table(data_dir / "stays.parquet", filters=[("split", "==", "val")])
    events = pq.read_table(
        data_dir / "events.parquet", filters=[("stay_id", "in", stays["stay_id"].to_pylist())]
    )
    try:
        ds = FlexiModalDataset.from_tables(stays, events, model.manifest)
        pred = predict(
            model.model, DataLoader(ds, batch_size=256, collate_fn=collate), torch.device("cpu")
        )
        scores = task_metrics(pred, model.spec, "val")
    except (FlexiModalError, ValueError) as e:
        raise RescoreError(f"the challenger's validation split does not fit it ({e})") from None
    key = metric[len(EVAL_PREFIX) :]
    if key not in scores:
        raise RescoreError(f"it has no {key}; it scores {sorted(scores)}")
    return float(scores[key])


def comparable_champion_metric(
    client, name: str, current, challenger_run, metric: str, data_dir: Path | None
) -> tuple[float | None, str, str | None]:
    """(value, source, refusal): the champion's `metric` on the challenger's validation data.

    Same data hash: the value evaluate logged for the champion. Other (or unknown) data: the
    champion re-scored on `data_dir`, which must hold the challenger's data."""
    who = f"champion version {current.version} (run {current.run_id})"
    champ_run = client.get_run(current.run_id)
    challenger_hash = challenger_run.data.tags.get("data_hash")
    champion_hash = champ_run.data.tags.get("data_hash")
    if challenger_hash is None:
        return None, "", f"challenger run {challenger_run.info.run_id} has no data_hash tag"
    if champion_hash == challenger_hash:
        value = champ_run.data.metrics.get(metric)
        if value is None:
            return None, "", f"{who} has no {metric} metric, so it cannot be compared"
        return float(value), "logged", None
    what = f"{who} was trained on data {str(champion_hash)[:12]}, the challenger on "
    what += f"{challenger_hash[:12]}"
    if data_dir is None or not (data_dir / "manifest.json").is_file():
        return None, "", f"{what}, and the challenger's data is not available to re-score it"
    if data_hash(data_dir) != challenger_hash:
        return None, "", f"{what}, and {data_dir} holds other data: cannot re-score it"
    try:
        return rescore(name, current.version, metric, data_dir), "re-scored", None
    except RescoreError as e:
        return None, "", f"{what}; cannot re-score it on the challenger's validation split: {e}"


def promote(
    client,
    name: str,
    version: str,
    metric: str,
    cfg: dict,
    force: bool = False,
    data_dir: Path | None = None,
) -> Decision:
    """Applies the promotion rule to `version` and moves `champion` if it passes (or if forced).
    `data_dir` is the challenger's FlexiModal data, used to re-score a champion trained on other
    data."""
    challenger = client.get_model_version(name, version)
    challenger_run = client.get_run(challenger.run_id)
    current = champion(client, name)
    challenger_metric = run_metric(client, challenger.run_id, metric)
    if current is not None and str(current.version) == str(challenger.version):
        return Decision(True, f"version {version} is already the champion", challenger_metric,
                        challenger_metric, str(current.version), "logged")  # fmt: skip
    ece_key = metric.replace("auroc", "ece").replace("auprc", "ece")
    champ_metric, source, refusal = None, None, None
    if current is not None:
        champ_metric, source, refusal = comparable_champion_metric(
            client, name, current, challenger_run, metric, data_dir
        )
    if refusal is not None:
        decision = Decision(False, refusal, challenger_metric, None, str(current.version))
    else:
        decision = decide(
            metric,
            challenger_metric,
            run_metric(client, challenger.run_id, ece_key) if ece_key != metric else None,
            champ_metric,
            float(cfg.get("min_improvement", 0.0)),
            float(cfg.get("max_ece", 1.0)),
            str(current.version) if current is not None else None,
        )
        decision.champion_metric_source = source
        if source == "re-scored":
            decision.reason += " (champion re-scored on the challenger's validation split)"
    if force and not decision.promote:
        decision.promote, decision.reason = True, f"forced ({decision.reason})"
    if decision.promote:
        if current is not None:
            client.set_registered_model_alias(name, "previous_champion", current.version)
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(
        name, version, "promotion_decision", "champion" if decision.promote else "challenger"
    )
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    return decision


def registered_version(client, name: str, run_id: str):
    """The (oldest) version of `name` registered from training run `run_id`, or None."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def public_uri(uri: str) -> str:
    """`uri` without a password, fit for a committed file."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


def register_run(
    client, run_id: str, data_dir: Path, cfg: dict, model_dir: Path = TRAIN_DIR
) -> dict:
    """Packages and registers training run `run_id` once, then applies the promotion rule; a run
    already registered keeps its version and its decision (a rollback is never undone)."""
    import mlflow

    from pipelines.packaging import log_pyfunc_model

    name, metric = cfg["model_name"], cfg["metric"]
    existing = registered_version(client, name, run_id)
    if existing is not None:
        version, model_uri = str(existing.version), existing.source
        current = champion(client, name)
        decision = Decision(
            current is not None and str(current.version) == version,
            f"run {run_id} is already registered as version {version}; not registered again "
            f"(its decision: {existing.tags.get('promotion_reason', 'none recorded')})",
            run_metric(client, run_id, metric),
            None,
            None if current is None else str(current.version),
        )
    else:
        model_uri = log_pyfunc_model(run_id, data_dir, model_dir)
        version = str(mlflow.register_model(model_uri, name).version)
        client.set_registered_model_alias(name, "challenger", version)
        decision = promote(client, name, version, metric, cfg, data_dir=data_dir)
    return {
        "model_name": name,
        "version": version,
        "model_uri": model_uri,
        "mlflow_run_id": run_id,
        "already_registered": existing is not None,
        "champion": decision.promote,
        **asdict(decision),
    }


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
    skip_final_gc()
    params = load_params(args.params, ("data", "mlflow", "registry"))
    import mlflow
    from mlflow.exceptions import MlflowException

    run = read_run()
    uri = tracking_uri(params["mlflow"])
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        client.get_run(run["mlflow_run_id"])
    except MlflowException:
        raise SystemExit(
            f"error: models/train/run.json: MLflow run {run['mlflow_run_id']} is not in the "
            f"tracking store {public_uri(uri)}; the train stage logged to another store "
            "(check mlflow.tracking_uri and MLFLOW_TRACKING_URI)"
        ) from None
    record = register_run(client, run["mlflow_run_id"], Path(params["data"]["out_dir"]),
                          params["registry"])  # fmt: skip
    # DVC cannot see MLFLOW_TRACKING_URI; recording the store used makes a change visible here.
    record["tracking_uri"] = public_uri(uri)
    write_json_atomic(REGISTRY_FILE, record)
    who = "champion" if record["champion"] else "challenger"
    print(f"register: {record['model_name']} version {record['version']} -> {who}: "
          f"{record['reason']}")  # fmt: skip


if __name__ == "__main__":
    main()
