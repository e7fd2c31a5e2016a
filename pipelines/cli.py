"""`fusemoe` console script: predict, promote or roll back the champion, embed raw items.

fusemoe predict records.parquet predictions.parquet [--model models:/fusemoe-ihm@champion]
    [--meds TASK]  (TASK's predictions in the MEDS prediction schema; stays from a MEDS prepare)
fusemoe promote 3 [--force]
fusemoe rollback
fusemoe embed notes.parquet --item-column text --encoder my_encoders:encode --modality note \
    --out my_data
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
    if args.meds:
        out = meds_output(out, args.meds, src)
    dst = Path(args.output)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".parquet.tmp")
    os.close(fd)
    if args.meds:
        import pyarrow.parquet as pq

        pq.write_table(out, tmp)
    else:
        out.to_parquet(tmp, index=False)
    os.replace(tmp, dst)
    print(f"predict: {len(out)} stays scored with {uri} -> {dst}")


def meds_output(out, task: str, src: Path):
    """The binary `task`'s column of predict's output as a MEDS prediction table (exits with a
    one-line error for a task that is not binary or stay ids not made by the MEDS reader)."""
    from fusemoe.data.meds import meds_predictions

    column = f"prob_{task}"
    if column not in out.columns:
        sys.exit(
            f"error: --meds {task}: the model gives no binary probability {column} "
            f"(its outputs: {', '.join(c for c in out.columns if c != 'stay_id')})"
        )
    try:
        return meds_predictions(out["stay_id"], out[column].to_numpy())
    except ValueError as e:
        sys.exit(f"error: {src}: {e}")


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


def cmd_embed(args, params: dict) -> None:
    from fusemoe.data.flexi import FlexiModalError
    from pipelines.embed import EncoderError, embed

    try:
        done = embed(
            args.items,
            args.out,
            args.modality,
            args.encoder,
            args.item_column,
            batch_size=args.batch_size,
            chunk_batches=args.chunk_batches,
            restart=args.restart,
        )
    except (FlexiModalError, EncoderError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("embed: interrupted; the same command resumes from the saved parts", file=sys.stderr)
        sys.exit(130)
    resumed = done["parts"] - done["encoded"]
    print(
        f"embed: {done['rows']} items -> {done['path']} (width {done['width']}; "
        f"{done['encoded']} of {done['parts']} parts encoded now, {resumed} resumed)"
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


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
    p.add_argument("--meds", metavar="TASK", help="write binary TASK in the MEDS prediction schema")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("promote", help="apply the promotion rule to a version")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="promote even if the rule says no (logged)")
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("rollback", help="make the previous champion the champion again")
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("embed", help="encode raw items into an embedding modality (resumable)")
    p.add_argument("items", help="Parquet table: stay_id, time_h and the item column")
    p.add_argument("--item-column", required=True, help="the column of raw items (text, a path)")
    p.add_argument("--encoder", required=True, help="module:function, batch of items -> [n, width]")
    p.add_argument("--modality", required=True, help="the embedding modality's name")
    p.add_argument("--out", required=True, help="the FlexiModal directory to add it to")
    p.add_argument("--batch-size", type=_positive, default=64, help="items per encoder call (64)")
    p.add_argument(
        "--chunk-batches", type=_positive, default=16, help="batches per saved part (16)"
    )
    p.add_argument("--restart", action="store_true", help="discard saved progress")
    p.set_defaults(fn=cmd_embed, sections=())
    args = parser.parse_args(argv)
    sections = getattr(args, "sections", ("data", "mlflow", "registry"))
    args.fn(args, load_params(args.params, sections) if sections else {})


if __name__ == "__main__":
    main()
