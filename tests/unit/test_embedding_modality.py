"""Embedding modalities (FlexiModal 1.1): one fixed-width vector per (stay, time) in
embeddings/<modality>.parquet, validated as strictly as scalar events."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusemoe.data.flexi import (
    FlexiModalError,
    load_manifest,
    validate_dir,
    write_flexi,
)

WIDTH = 3
MANIFEST = {
    "source": "test",
    "modalities": [
        {"name": "vitals", "kind": "series", "variables": ["HR"]},
        {"name": "note", "kind": "embedding", "width": WIDTH},
    ],
    "tasks": [{"name": "ihm", "kind": "binary"}],
}
NOTE = "embeddings/note.parquet (to write)"


def _stays() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "d", "e"],
            "split": ["train", "train", "val", "test", "train"],
            "ihm": np.array([0, 1, 0, 1, 1], np.int8),
        }
    )


def _events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "stay_id": ["a", "b", "c", "d"],
            "modality": pd.Categorical(["vitals"] * 4),
            "variable": pd.Categorical(["HR"] * 4),
            "time_h": np.array([0.0, 1.0, 2.0, 3.0], np.float32),
            "value": np.array([80, 90, 70, 60], np.float32),
        }
    )


def _notes(**override) -> dict:
    """Columns of a valid note table: stay e has only notes, stay d has none."""
    cols = {
        "stay_id": pa.array(["a", "a", "b", "c", "e"]),
        "time_h": pa.array([1.0, 5.0, 2.0, 0.0, 3.0], pa.float32()),
        "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(np.arange(15, dtype=np.float32)), WIDTH
        ),
    }
    return cols | override


def _write(tmp_path, notes: dict | None = None, manifest: dict = MANIFEST, **embeddings) -> dict:
    tables = embeddings or {"note": pa.table(notes if notes is not None else _notes())}
    return write_flexi(tmp_path / "ds", _stays(), _events(), manifest, embeddings=tables)


def _error(tmp_path, notes: dict | None = None, manifest: dict = MANIFEST, **embeddings) -> str:
    with pytest.raises(FlexiModalError) as info:
        _write(tmp_path, notes, manifest, **embeddings)
    msg = str(info.value)
    assert "\n" not in msg
    assert not (tmp_path / "ds").exists()  # nothing written
    return msg


def test_written_embedding_modality_round_trips_with_counts_per_split(tmp_path):
    manifest = _write(tmp_path)
    assert manifest["schema_version"] == "1.1"
    assert load_manifest(tmp_path / "ds") == validate_dir(tmp_path / "ds") == manifest
    table = pq.read_table(tmp_path / "ds" / "embeddings" / "note.parquet")
    assert table.schema.field("vector").type == pa.list_(pa.float32(), WIDTH)
    assert manifest["counts"]["events_per_modality"]["note"] == 5
    assert manifest["counts"]["stays_with_modality"]["note"] == 4
    assert manifest["missingness"]["modality"]["note"] == {
        "all": 0.2,
        "train": 0.0,
        "val": 0.0,
        "test": 1.0,
    }
    assert "embeddings/note.parquet" in manifest["files"]
    assert "note" not in manifest["norm"]


def test_a_stay_with_only_vectors_counts_as_observed(tmp_path):
    manifest = _write(tmp_path)  # stay e has no event and no static value, only a note
    assert manifest["counts"]["stays"] == 5


def test_wrong_width_is_rejected_naming_row_and_width(tmp_path):
    vectors = pa.array([[1.0, 2.0, 3.0]] * 4 + [[1.0, 2.0]], pa.list_(pa.float32()))
    msg = _error(tmp_path, _notes(vector=vectors))
    assert msg == f"{NOTE}, row 4, column 'vector': vector has 2 values, expected width 3"


def test_fixed_size_vectors_of_another_width_are_rejected(tmp_path):
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.float32)), 2)
    msg = _error(tmp_path, _notes(vector=vectors))
    assert msg == f"{NOTE}, row 0, column 'vector': vector has 2 values, expected width 3"


def test_wrong_vector_type_is_rejected(tmp_path):
    msg = _error(tmp_path, _notes(vector=pa.array(["x"] * 5)))
    assert msg.startswith(f"{NOTE}, column 'vector': wrong type string, expected fixed_size_list")
    strings = pa.array([["a", "b", "c"]] * 5)
    msg = _error(tmp_path, _notes(vector=strings))
    assert msg.startswith(f"{NOTE}, column 'vector': wrong type list<item: string>")


def test_float64_lists_and_times_are_cast_losslessly_and_recorded(tmp_path):
    vectors = [np.arange(3, dtype=np.float64) + i for i in range(5)]
    notes = pd.DataFrame(
        {"stay_id": ["a", "a", "b", "c", "e"], "time_h": [1.0, 5.0, 2.0, 0.0, 3.0]}
    )
    notes["vector"] = vectors  # pandas -> list<double>, the way users' frames arrive
    manifest = _write(tmp_path, note=notes)
    assert manifest["casts"]["embeddings/note.parquet"] == {
        "time_h": "double -> float",
        "vector": "list<item: double> -> fixed_size_list<item: float>[3]",
    }
    stored = pq.read_table(tmp_path / "ds" / "embeddings" / "note.parquet")
    assert stored.column("vector")[4].as_py() == [4.0, 5.0, 6.0]


def test_lossy_vector_value_is_rejected_naming_row_and_value(tmp_path):
    vectors = pa.array([[0.5, 1e40, 0.3]] * 5, pa.list_(pa.float64()))
    msg = _error(tmp_path, _notes(vector=vectors))
    assert msg.startswith(
        f"{NOTE}, row 0, column 'vector': value 1e+40 does not fit list<item: float> without loss"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_vector_value_is_rejected_naming_row_and_dimension(tmp_path, bad):
    flat = np.arange(15, dtype=np.float32)
    flat[3 * 2 + 1] = bad
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat), WIDTH)
    msg = _error(tmp_path, _notes(vector=vectors))
    assert msg == f"{NOTE}, row 2, column 'vector': vector value 1 is not finite ({bad})"


def test_null_vector_is_rejected(tmp_path):
    vectors = pa.array([[1.0, 2.0, 3.0]] * 4 + [None], pa.list_(pa.float32()))
    assert _error(tmp_path, _notes(vector=vectors)) == (
        f"{NOTE}, row 4, column 'vector': missing (null) value"
    )


@pytest.mark.parametrize(
    ("time", "problem"),
    [
        (-1.0, "negative time -1.0 h"),
        (np.inf, "time is not finite (inf)"),
        (np.nan, "time is not finite (nan)"),
    ],
)
def test_bad_time_is_rejected_with_row_number(tmp_path, time, problem):
    times = pa.array([1.0, 5.0, time, 0.0, 3.0], pa.float32(), from_pandas=False)
    assert _error(tmp_path, _notes(time_h=times)) == f"{NOTE}, row 2, column 'time_h': {problem}"


def test_vector_of_an_unknown_stay_is_rejected(tmp_path):
    msg = _error(tmp_path, _notes(stay_id=pa.array(["a", "a", "b", "zz", "e"])))
    assert msg == f"{NOTE}, row 3, column 'stay_id': stay_id 'zz' is not in stays (to write)"


def test_two_vectors_of_a_stay_at_the_same_time_are_rejected(tmp_path):
    times = pa.array([1.0, 1.0, 2.0, 0.0, 3.0], pa.float32())
    assert _error(tmp_path, _notes(time_h=times)) == (
        f"{NOTE}, row 1, column 'time_h': stay 'a' already has a note vector at 1.0 h "
        "(one vector per time; average or drop repeats)"
    )


def test_declared_embedding_modality_without_its_table_is_rejected(tmp_path):
    with pytest.raises(FlexiModalError) as info:
        write_flexi(tmp_path / "ds", _stays(), _events(), MANIFEST)
    assert str(info.value) == (
        "embeddings/note.parquet: file not found (the manifest declares embedding modality 'note')"
    )


def test_table_of_an_undeclared_embedding_modality_is_rejected(tmp_path):
    msg = _error(tmp_path, note=pa.table(_notes()), cxr=pa.table(_notes()))
    assert msg == (
        "embeddings/cxr.parquet (to write): modality 'cxr' is not an embedding modality of the "
        "manifest"
    )


def test_directory_with_a_missing_or_an_extra_embedding_file_is_rejected(tmp_path):
    _write(tmp_path)
    note = tmp_path / "ds" / "embeddings" / "note.parquet"
    extra = tmp_path / "ds" / "embeddings" / "cxr.parquet"
    extra.write_bytes(note.read_bytes())
    with pytest.raises(FlexiModalError, match="cxr.parquet: modality 'cxr' is not an embedding"):
        validate_dir(tmp_path / "ds")
    extra.unlink()
    note.unlink()
    with pytest.raises(FlexiModalError) as info:
        validate_dir(tmp_path / "ds")
    assert str(info.value) == (
        f"{note}: file not found (the manifest declares embedding modality 'note')"
    )


def test_width_mismatch_in_a_stored_file_is_rejected(tmp_path):
    _write(tmp_path)
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["modalities"][1]["width"] = 4
    path.write_text(json.dumps(manifest))
    with pytest.raises(FlexiModalError, match="column 'vector': vectors have width 3, the "):
        validate_dir(tmp_path / "ds")


@pytest.mark.parametrize("width", [0, "32", None, 2.5])
def test_embedding_modality_needs_a_positive_integer_width(tmp_path, width):
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["modalities"][1]["width"] = width
    msg = _error(tmp_path, manifest=manifest)
    assert f"embedding modality 'note' needs an integer 'width' >= 1, got {width!r}" in msg


def test_a_1_0_manifest_cannot_declare_an_embedding_modality(tmp_path):
    _write(tmp_path)
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = "1.0"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FlexiModalError, match="embedding modality 'note' needs schema_version 1.1"):
        load_manifest(tmp_path / "ds")


def test_a_1_0_directory_without_embeddings_still_reads(tmp_path):
    manifest = {**MANIFEST, "modalities": MANIFEST["modalities"][:1]}
    stays = _stays().iloc[:4]
    write_flexi(tmp_path / "ds", stays, _events(), manifest)
    path = tmp_path / "ds" / "manifest.json"
    old = json.loads(path.read_text()) | {"schema_version": "1.0"}
    path.write_text(json.dumps(old))
    assert validate_dir(tmp_path / "ds")["schema_version"] == "1.0"


def test_vectors_of_an_embedding_modality_in_events_are_pointed_to_their_file(tmp_path):
    events = _events()
    events["modality"] = pd.Categorical(["vitals", "vitals", "vitals", "note"])
    with pytest.raises(FlexiModalError) as info:
        write_flexi(
            tmp_path / "ds", _stays(), events, MANIFEST, embeddings={"note": pa.table(_notes())}
        )
    assert str(info.value) == (
        "events (to write), row 3, column 'modality': modality 'note' is an embedding modality "
        "(its vectors belong in embeddings/note.parquet)"
    )


# ----------------------------------------------------------------------------- loading and model


def test_dataset_reads_each_shards_vectors_in_time_order_and_collate_pads_them(tmp_path):
    import torch

    from fusemoe.data.dataset import FlexiModalDataset, collate, dataset_spec

    notes = _notes(time_h=pa.array([5.0, 1.0, 2.0, 0.0, 3.0], pa.float32()))  # a's out of order
    _write(tmp_path, notes)
    full = FlexiModalDataset(tmp_path / "ds", "train")
    assert full.spec.embeddings == {"note": WIDTH} == dataset_spec(full.manifest).embeddings
    a = full[full.stay_ids.index("a")]["embeddings"]["note"]
    np.testing.assert_array_equal(a["times"], [1.0, 5.0])
    np.testing.assert_array_equal(a["values"], [[3, 4, 5], [0, 1, 2]])
    batch = collate([full[i] for i in range(len(full))])  # train stays a, b, e
    note = batch["embeddings"]["note"]
    assert note["values"].shape == (3, 2, WIDTH) and note["times"].shape == (3, 2)
    assert note["mask"].tolist() == [[1, 1], [1, 0], [1, 0]]
    assert batch["present"]["note"].tolist() == [True, True, True]
    shard = FlexiModalDataset(tmp_path / "ds", "train", shard=(1, 2))  # stay b only
    assert shard.stay_ids == ["b"] and shard.embeddings["note"].vectors.shape == (1, WIDTH)
    test = collate([FlexiModalDataset(tmp_path / "ds", "test")[0]])  # stay d has no note
    assert test["present"]["note"].tolist() == [False]
    assert torch.equal(test["embeddings"]["note"]["mask"], torch.zeros(1, 1))


def test_model_with_an_embedding_modality_round_trips_through_model_io(tmp_path):
    import torch

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.model_io import build_model, load_model, save_model

    _write(tmp_path)
    ds = FlexiModalDataset(tmp_path / "ds", "all")
    params = {"d_model": 8, "n_heads": 2, "num_ref_points": 3, "num_experts": 2, "top_k": 1}
    torch.manual_seed(0)
    model = build_model(params, ds.spec).eval()
    save_model(model.state_dict(), params, ds.spec, tmp_path / "model")
    loaded, spec = load_model(tmp_path / "model")
    assert spec == ds.spec
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits["ihm"], model(batch).logits["ihm"])


# ----------------------------------------------------------------------------- the model uses it


def _test_auroc(data_dir, epochs: int = 5) -> float:
    """Train a tiny FuseMoE on ihm with the shipped pieces; test AUROC of the last epoch."""
    import torch
    from torch.utils.data import DataLoader

    from fusemoe.data.dataset import FlexiModalDataset, collate
    from fusemoe.inference import predict
    from fusemoe.loop import select_tasks, set_seed
    from fusemoe.metrics import binary_metrics
    from fusemoe.model_io import build_model
    from fusemoe.nn.losses import task_loss

    set_seed(0)
    train = FlexiModalDataset(data_dir, "train", tasks=["ihm"])
    spec = select_tasks(train.spec, ["ihm"])
    model = build_model(
        dict(
            d_model=16,
            n_heads=2,
            num_ref_points=4,
            num_experts=4,
            top_k=2,
            expert_hidden=32,
            dropout=0.0,
        ),
        spec,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate, generator=gen)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            out = model(batch)
            loss = task_loss(out.logits, batch["labels"], spec.tasks) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = DataLoader(FlexiModalDataset(data_dir, "test", tasks=["ihm"]), 256, collate_fn=collate)
    pred = predict(model, test, torch.device("cpu"))
    return binary_metrics(pred["labels"]["ihm"], 1 / (1 + np.exp(-pred["logits"]["ihm"])))["auroc"]


def test_fusemoe_uses_the_synthetic_note_it_scores_far_better_with_it_than_without(tmp_path):
    import torch

    from fusemoe.data.synthetic import synthesize

    torch.set_num_threads(1)
    stays, events, manifest, embeddings = synthesize(
        num_stays=400, seed=0, note_width=16, split=(0.6, 0.1, 0.3)
    )
    write_flexi(tmp_path / "with", stays, events, manifest, embeddings=embeddings)
    without = {
        **manifest,
        "modalities": [m for m in manifest["modalities"] if m["kind"] != "embedding"],
    }
    write_flexi(tmp_path / "without", stays, events, without)
    with_note, without_note = _test_auroc(tmp_path / "with"), _test_auroc(tmp_path / "without")
    assert with_note > 0.68 and with_note > without_note + 0.15, (with_note, without_note)


def test_vectors_are_read_row_group_by_row_group_keeping_only_the_stays_asked_for(tmp_path):
    from fusemoe.data.flexi import read_vectors

    table = pa.table(_notes())
    pq.write_table(table, tmp_path / "n.parquet", row_group_size=2)  # 3 row groups
    assert read_vectors(str(tmp_path / "n.parquet")).equals(table)
    only = read_vectors(str(tmp_path / "n.parquet"), stay_ids=pa.array(["a", "e"]))
    assert only.column("stay_id").to_pylist() == ["a", "a", "e"]
    assert only.column("vector").to_pylist()[2] == [12.0, 13.0, 14.0]
