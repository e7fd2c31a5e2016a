"""`fusemoe` console script: predict with a registered model, promote or roll back the champion.

fusemoe predict records.parquet predictions.parquet [--model models:/fusemoe-ihm@champion]
fusemoe promote 3 [--force]
fusemoe rollback
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pipelines.common import load_params, skip_final_gc, tracking_uri


def _client(params: dict):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    return mlflow.MlflowClient()


def cmd_predict(args, params: dict) -> None:
    import mlflow
    import pandas as pd

    from pipelines.packaging import RecordsError

    src = Path(args.records)
    if not src.is_file():
        sys.exit(f"error: {src}: no such file")
    try:
        records = pd.read_parquet(src)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        sys.exit(f"error: {src}: not a readable Parquet file ({type(e).__name__})")
    mlflow.set_tracking_uri(tracking_uri(params["mlflow"]))
    uri = args.model or f"models:/{params['registry']['model_name']}@champion"
    model = mlflow.pyfunc.load_model(uri)
    try:
        # The python model itself, so input is checked by our validator, not MLflow's schema coercion.
        out = model.unwrap_python_model().predict(None, records)
    except RecordsError as e:
        sys.exit(f"error: {src}: {e}")
    dst = Path(args.output)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".parquet.tmp")
    os.close(fd)
    out.to_parquet(tmp, index=False)
    os.replace(tmp, dst)
    print(f"predict: {len(out)} stays scored with {uri} -> {dst}")


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        sys.exit(f"error: registered model {name} has no version {version}")


def cmd_promote(args, params: dict) -> None:
    from pipelines.register import promote

    cfg = params["registry"]
    client = _client(params)
    _version(client, cfg["model_name"], str(args.version))
    decision = promote(
        client,
        cfg["model_name"],
        str(args.version),
        cfg["metric"],
        cfg,
        force=args.force,
        data_dir=Path(params["data"]["out_dir"]),
    )
    print(
        f"promote: version {args.version} -> {'champion' if decision.promote else 'unchanged'}: "
        f"{decision.reason}"
    )
    if not decision.promote:
        sys.exit(1)


def cmd_rollback(args, params: dict) -> None:
    from mlflow.exceptions import MlflowException

    from pipelines.register import champion

    name = params["registry"]["model_name"]
    client = _client(params)
    current = champion(client, name)
    if current is None:
        sys.exit(f"error: {name} has no champion to roll back")
    try:
        previous = client.get_model_version_by_alias(name, "previous_champion")
    except MlflowException:
        sys.exit(f"error: {name} has no previous_champion to roll back to")
    client.set_registered_model_alias(name, "champion", previous.version)
    client.set_registered_model_alias(name, "previous_champion", current.version)
    client.set_model_version_tag(
        name, previous.version, "promotion_reason", f"rollback from version {current.version}"
    )
    print(f"rollback: champion {current.version} -> {previous.version}")


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the console script: a process of its own
        skip_final_gc()
    parser = argparse.ArgumentParser(prog="fusemoe", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="score FlexiModal records (Parquet) with a registered model")
    p.add_argument("records")
    p.add_argument("output")
    p.add_argument("--model", help="model URI (default models:/<registry.model_name>@champion)")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("promote", help="apply the promotion rule to a version")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="promote even if the rule says no (logged)")
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("rollback", help="make the previous champion the champion again")
    p.set_defaults(fn=cmd_rollback)
    args = parser.parse_args(argv)
    args.fn(args, load_params(args.params, ("data", "mlflow", "registry")))


if __name__ == "__main__":
    main()
