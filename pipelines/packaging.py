"""The model as users consume it: an MLflow pyfunc that scores raw FlexiModal records.

Input is one long table, the same shape as events.parquet plus the static descriptors as rows of
the static modality: columns stay_id, modality, variable, time_h, value. The training manifest
(modalities, variables, train-split normalisation) travels inside the model, so
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(records)` needs nothing else.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa

RECORD_COLUMNS = {
    "stay_id": "string",
    "modality": "string",
    "variable": "string",
    "time_h": "float",
    "value": "float",
}


class RecordsError(ValueError):
    """Bad prediction input: names the column/row and what was expected."""


def _bad(problem: str, row: int | None = None, column: str | None = None) -> RecordsError:
    """A RecordsError worded like the training-time validator's (`records, row 3, column ...`)."""
    from fusemoe.data.flexi import FlexiModalError

    return RecordsError(str(FlexiModalError("records", problem, row=row, column=column)))


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def records_to_tables(
    records: pd.DataFrame, manifest: dict
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Long records -> (stays, events) tables in the manifest's FlexiModal layout (labels empty)
    and, per event row, its row in `records` (so later errors name the user's row).

    Checked here, as prepare checks a FlexiModal directory: exact columns, no nulls, numeric
    times/values cast to float32 only losslessly (prepare's rule), non-empty stay ids, known
    modalities, and static rows: known variables, finite values, at most one per stay and variable
    (their time_h is ignored). Event rows are then checked by the training-time events validator.
    """
    from fusemoe.data.flexi import FlexiModalError, cast_losslessly

    unknown = [c for c in records.columns if c not in RECORD_COLUMNS]
    if unknown:
        raise _bad(f"unknown column; expected {', '.join(RECORD_COLUMNS)}", column=str(unknown[0]))
    for col in RECORD_COLUMNS:
        if col not in records.columns:
            raise _bad(
                f"required column is missing; expected {', '.join(RECORD_COLUMNS)}", column=col
            )
    if len(records) == 0:
        raise _bad("no rows (nothing to score)")
    records = records.reset_index(drop=True)
    for col in ("stay_id", "modality", "variable", "value"):
        if records[col].isna().any():
            raise _bad("missing (null) value", row=_first(records[col].isna()), column=col)
    for col in ("time_h", "value"):
        if not pd.api.types.is_numeric_dtype(records[col]):
            bad = pd.to_numeric(records[col], errors="coerce").isna() & records[col].notna()
            row = _first(bad) if bad.any() else 0
            raise _bad(f"must be numeric, got {records[col].iloc[row]!r}", row=row, column=col)
        try:
            cast = cast_losslessly(pa.array(records[col]), pa.float32(), "records", col)
        except FlexiModalError as e:
            raise RecordsError(str(e)) from None
        records[col] = cast.to_numpy(zero_copy_only=False)
    records["stay_id"] = records["stay_id"].astype(str)
    empty = records["stay_id"] == ""
    if empty.any():
        raise _bad("empty stay_id", row=_first(empty), column="stay_id")

    modalities = {m["name"]: m for m in manifest["modalities"]}
    unknown_mod = ~records["modality"].isin(list(modalities))
    if unknown_mod.any():
        row = _first(unknown_mod)
        raise _bad(
            f"unknown modality {records['modality'].iloc[row]!r}; expected one of {list(modalities)}",
            row=row,
            column="modality",
        )
    static = next((m for m in manifest["modalities"] if m["kind"] == "static"), None)
    is_static = (
        (records["modality"] == static["name"]).to_numpy()
        if static
        else np.zeros(len(records), bool)
    )
    ids = pd.unique(records["stay_id"])
    stays = pd.DataFrame({"stay_id": ids, "split": "test"})
    for task in manifest["tasks"]:
        stays[task["column"]] = None
    if static is not None:
        rows = records[is_static]
        unknown_var = ~rows["variable"].isin(static["variables"])
        if unknown_var.any():
            i = int(rows.index[_first(unknown_var)])
            raise _bad(
                f"unknown variable '{records['variable'].iloc[i]}' for modality "
                f"'{static['name']}' (not in the manifest)",
                row=i,
                column="variable",
            )
        values = rows["value"].to_numpy()
        if not np.isfinite(values).all():
            i = int(rows.index[_first(~np.isfinite(values))])
            raise _bad(
                f"static value is not finite ({records['value'].iloc[i]})", row=i, column="value"
            )
        twice = rows.duplicated(["stay_id", "variable"])
        if twice.any():
            i = int(rows.index[_first(twice)])
            sid, var = records["stay_id"].iloc[i], records["variable"].iloc[i]
            same = (rows["stay_id"] == sid) & (rows["variable"] == var)
            raise _bad(
                f"stay '{sid}' has static variable '{var}' twice "
                f"(first at row {int(rows.index[_first(same)])})",
                row=i,
                column="variable",
            )
        wide = rows.pivot(index="stay_id", columns="variable", values="value")
        wide = wide.reindex(columns=static["variables"])  # absent variables: all missing
        for v in static["variables"]:
            stays[v] = stays["stay_id"].map(wide[v]).astype("float32")
    event_rows = np.flatnonzero(~is_static)
    events = records.iloc[event_rows][list(RECORD_COLUMNS)].astype(
        {"stay_id": str, "modality": str, "variable": str, "time_h": "float32", "value": "float32"}
    )
    return (
        pa.Table.from_pandas(stays, preserve_index=False),
        pa.Table.from_pandas(events, preserve_index=False),
        event_rows,
    )


class FuseMoEPyfunc(mlflow.pyfunc.PythonModel):
    """Per stay, from raw records: the columns of fusemoe.inference.predictions_table (probabilities,
    values, per-class/per-label probabilities and the predicted class)."""

    def load_context(self, context) -> None:
        from fusemoe.model_io import load_model

        self.model, self.spec = load_model(Path(context.artifacts["model_dir"]))
        self.manifest = json.loads(Path(context.artifacts["manifest"]).read_text())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return score_records(self.model, self.spec, self.manifest, model_input)


def score_records(model, spec, manifest: dict, records: pd.DataFrame) -> pd.DataFrame:
    """Predictions for every stay of `records`; any bad input or non-finite output is a
    RecordsError (one line naming the records row/column or the stay), never a partial answer."""
    import torch
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.data.flexi import FlexiModalError
    from fusemoe.inference import NonFinitePrediction, predict, predictions_table

    if not isinstance(records, pd.DataFrame):
        raise RecordsError(f"records: expected a pandas DataFrame, got {type(records).__name__}")
    stays, events, event_rows = records_to_tables(records, manifest)
    try:
        ds = FlexiModalDataset.from_tables(stays, events, manifest)
    except FlexiModalError as e:  # event rows renumbered as rows of the user's records
        on_event = e.row is not None and e.column is not None and e.file == "records"
        row = int(event_rows[e.row]) if on_event else None
        raise _bad(e.problem, row=row, column=e.column) from None
    pred = predict(model, DataLoader(ds, batch_size=256, collate_fn=collate), torch.device("cpu"))
    try:
        return predictions_table(pred, spec)
    except NonFinitePrediction as e:
        raise RecordsError(f"records: {e}") from None


def example_records(data_dir: Path, n_stays: int = 2) -> pd.DataFrame:
    """A few real test-split stays in record form: the model's input example."""
    stays = pd.read_parquet(data_dir / "stays.parquet")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    ids = stays.loc[stays["split"] == "test", "stay_id"].head(n_stays).tolist()
    events = pd.read_parquet(data_dir / "events.parquet", filters=[("stay_id", "in", ids)])
    events = events.astype({"modality": str, "variable": str})
    static = next((m for m in manifest["modalities"] if m["kind"] == "static"), None)
    parts = [events[list(RECORD_COLUMNS)]]
    if static is not None:
        s = (
            stays[stays["stay_id"].isin(ids)]
            .melt(
                id_vars="stay_id",
                value_vars=static["variables"],
                var_name="variable",
                value_name="value",
            )
            .dropna()
        )
        s["modality"], s["time_h"] = static["name"], 0.0
        parts.append(s[list(RECORD_COLUMNS)])
    return pd.concat(parts, ignore_index=True).astype({"time_h": "float32", "value": "float32"})


def log_pyfunc_model(run_id: str, data_dir: Path, model_dir: Path = Path("models/train")) -> str:
    """Logs the pyfunc (weights, config, manifest, signature, input example) to `run_id`.

    The code it runs (the `fusemoe` and `pipelines` packages) travels in the model as MLflow
    `code_paths`, and its pip requirements pin what that code imports, so it loads and predicts
    where this project is not installed."""
    from mlflow.models import infer_signature

    example = example_records(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        shutil.copy2(data_dir / "manifest.json", manifest)
        artifacts = {"model_dir": str(model_dir), "manifest": str(manifest)}
        py = FuseMoEPyfunc()

        class _Ctx:  # the signature comes from a real prediction on the example
            pass

        ctx = _Ctx()
        ctx.artifacts = artifacts
        py.load_context(ctx)
        signature = infer_signature(example, py.predict(ctx, example))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=FuseMoEPyfunc(),
                artifacts=artifacts,
                code_paths=code_paths(),
                signature=signature,
                input_example=example,
                pip_requirements=requirements(),
            )
    return info.model_uri


# What the packaged code imports (fusemoe: torch, numpy, pandas, pyarrow, scikit-learn; the pyfunc
# itself: mlflow, which unpickles it with cloudpickle).
RUNTIME_PACKAGES = ("torch", "numpy", "pandas", "pyarrow", "scikit-learn", "mlflow", "cloudpickle")
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"


def code_paths() -> list[str]:
    """The packages the pyfunc imports: `fusemoe` (model, data, metrics) and `pipelines` (this
    module, where the pickled python model's class lives). MLflow copies them without caches."""
    import fusemoe

    return [str(Path(fusemoe.__file__).parent), str(Path(__file__).parent)]


def requirements(lock: Path = LOCK_FILE) -> list[str]:
    """`RUNTIME_PACKAGES` pinned as in requirements.lock (the installed version where there is
    no lock). A local version label such as torch's `+cpu` is dropped: it names the build
    (CPU or CUDA wheel index) of this machine, not the API the model needs."""
    from importlib.metadata import version

    pins = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, sep, pin = line.partition("==")
            if sep and not line.startswith((" ", "#")):
                pins[name.strip().lower()] = pin.strip().split("+")[0]
    return [f"{p}=={pins.get(p) or version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]
