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


def records_to_tables(records: pd.DataFrame, manifest: dict) -> tuple[pa.Table, pa.Table]:
    """Long records -> (stays, events) tables in the manifest's FlexiModal layout, labels empty."""
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise RecordsError(f"records: missing column(s) {missing}; expected {list(RECORD_COLUMNS)}")
    for col in ("time_h", "value"):
        if not pd.api.types.is_numeric_dtype(records[col]):
            bad = pd.to_numeric(records[col], errors="coerce").isna() & records[col].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise RecordsError(
                f"records: column '{col}' must be numeric; row {row} has {records[col].iloc[row]!r}"
            )
    modalities = {m["name"]: m for m in manifest["modalities"]}
    unknown = ~records["modality"].isin(list(modalities))
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise RecordsError(
            f"records: row {row}: unknown modality {records['modality'].iloc[row]!r}; "
            f"expected one of {list(modalities)}"
        )
    static = next((m for m in manifest["modalities"] if m["kind"] == "static"), None)
    ids = pd.unique(records["stay_id"].astype(str))
    stays = pd.DataFrame({"stay_id": ids, "split": "test"})
    for task in manifest["tasks"]:
        stays[task["column"]] = None
    if static is not None:
        rows = records[records["modality"] == static["name"]]
        wide = rows.pivot_table(
            index="stay_id", columns="variable", values="value", aggfunc="first"
        )
        for v in static["variables"]:
            col = wide[v] if v in wide.columns else pd.Series(dtype="float32")
            stays[v] = stays["stay_id"].map(col).astype("float32")
    events = records[records["modality"] != (static["name"] if static else None)][
        list(RECORD_COLUMNS)
    ]
    events = events.astype({"stay_id": str, "time_h": "float32", "value": "float32"})
    return pa.Table.from_pandas(stays, preserve_index=False), pa.Table.from_pandas(
        events, preserve_index=False
    )


class FuseMoEPyfunc(mlflow.pyfunc.PythonModel):
    """Probabilities (binary tasks) or values (regression) per stay, from raw records."""

    def load_context(self, context) -> None:
        from fusemoe.train import load_model

        self.model, self.spec = load_model(Path(context.artifacts["model_dir"]))
        self.manifest = json.loads(Path(context.artifacts["manifest"]).read_text())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return score_records(self.model, self.spec, self.manifest, model_input)


def score_records(model, spec, manifest: dict, records: pd.DataFrame) -> pd.DataFrame:
    import torch
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.data.flexi import FlexiModalError
    from fusemoe.train import predict, predictions_table

    stays, events = records_to_tables(records, manifest)
    try:
        ds = FlexiModalDataset.from_tables(stays, events, manifest)
    except FlexiModalError as e:
        raise RecordsError(str(e)) from None
    pred = predict(model, DataLoader(ds, batch_size=256, collate_fn=collate), torch.device("cpu"))
    return predictions_table(pred, spec)


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
