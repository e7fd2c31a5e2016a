"""DVC stage `register`: package the model, register it, move aliases only when it is earned.

Every new version gets the alias `challenger`. `champion` moves to it only when it beats the current
champion's validation metric by `registry.min_improvement` and passes the sanity gates (finite
metric, calibration error within `registry.max_ece`); the first model becomes champion. The decision
and its reason are tagged on the version and written to models/registry.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.common import load_params, read_run, stage_args, tracking_uri, write_json_atomic

REGISTRY_FILE = Path("models/registry.json")


@dataclass
class Decision:
    promote: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None
    champion_version: str | None


def decide(
    challenger_metric: float,
    challenger_ece: float | None,
    champion_metric: float | None,
    min_improvement: float,
    max_ece: float,
    champion_version: str | None = None,
) -> Decision:
    """Pure promotion rule, so it can be tested without a registry."""

    def make(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, challenger_metric, champion_metric, champion_version)

    if challenger_metric is None or not math.isfinite(challenger_metric):
        return make(False, f"challenger metric is not finite ({challenger_metric})")
    if challenger_ece is not None and (
        not math.isfinite(challenger_ece) or challenger_ece > max_ece
    ):
        return make(False, f"calibration gate: ECE {challenger_ece:.4f} > max_ece {max_ece}")
    if champion_metric is None:
        return make(True, "no champion yet")
    if challenger_metric > champion_metric + min_improvement:
        return make(
            True,
            f"{challenger_metric:.4f} beats champion {champion_metric:.4f} "
            f"by more than {min_improvement}",
        )
    return make(
        False,
        f"{challenger_metric:.4f} does not beat champion {champion_metric:.4f} "
        f"by more than {min_improvement}",
    )


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


def promote(
    client, name: str, version: str, metric: str, cfg: dict, force: bool = False
) -> Decision:
    """Applies the promotion rule to `version` and moves `champion` if it passes (or if forced)."""
    challenger = client.get_model_version(name, version)
    current = champion(client, name)
    champ_metric = run_metric(client, current.run_id, metric) if current is not None else None
    ece_key = metric.replace("auroc", "ece").replace("auprc", "ece")
    decision = decide(
        run_metric(client, challenger.run_id, metric),
        run_metric(client, challenger.run_id, ece_key) if ece_key != metric else None,
        champ_metric,
        float(cfg.get("min_improvement", 0.0)),
        float(cfg.get("max_ece", 1.0)),
        current.version if current is not None else None,
    )
    if force and not decision.promote:
        decision = Decision(
            True,
            f"forced ({decision.reason})",
            decision.challenger_metric,
            decision.champion_metric,
            decision.champion_version,
        )
    if decision.promote:
        if current is not None:
            client.set_registered_model_alias(name, "previous_champion", current.version)
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(
        name, version, "promotion_decision", "champion" if decision.promote else "challenger"
    )
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    return decision


def main() -> None:
    args = stage_args(__doc__.splitlines()[0])
    params = load_params(args.params, ("data", "mlflow", "registry"))
    import mlflow

    from pipelines.packaging import log_pyfunc_model

    run = read_run()
    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    client = mlflow.MlflowClient()
    cfg = params["registry"]
    name = cfg["model_name"]
    model_uri = log_pyfunc_model(run["mlflow_run_id"], Path(params["data"]["out_dir"]))
    version = str(mlflow.register_model(model_uri, name).version)
    client.set_registered_model_alias(name, "challenger", version)
    decision = promote(client, name, version, cfg["metric"], cfg)
    record = {
        "model_name": name,
        "version": version,
        "model_uri": model_uri,
        "champion": decision.promote,
        **asdict(decision),
    }
    write_json_atomic(REGISTRY_FILE, record)
    who = "champion + challenger" if decision.promote else "challenger"
    print(f"register: {name} version {version} -> {who}: {decision.reason}")


if __name__ == "__main__":
    main()
