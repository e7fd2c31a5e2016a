"""Subject-level splits: the optional stays column `subject_id` keeps a person in one split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fusemoe.data.flexi import FlexiModalError, assign_splits, write_flexi
from fusemoe.data.synthetic import generate_synthetic
from pipelines.prepare import prepare


def subjects_with_several_stays(n_subjects: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_subjects)
    subject = np.repeat(np.arange(n_subjects), per)
    risk = rng.random(n_subjects) < 0.3
    return pd.DataFrame(
        {"subject_id": subject.astype(str), "ihm": risk[subject].astype(np.int8)}
    ).sample(frac=1.0, random_state=seed)  # a subject's stays are not adjacent


def test_assigned_splits_never_put_one_subject_in_two_splits():
    df = subjects_with_several_stays()
    df["split"] = assign_splits(df, (0.7, 0.15, 0.15), seed=3, stratify_col="ihm",
                                group_col="subject_id")  # fmt: skip
    assert (df.groupby("subject_id")["split"].nunique() == 1).all()
    per_subject = df.drop_duplicates("subject_id")
    share = per_subject["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.02)
    rates = per_subject.groupby("split")["ihm"].mean()  # stratified on the subject's label
    assert rates.max() - rates.min() < 0.03


def test_ungrouped_assignment_splits_subjects_which_is_why_grouping_exists():
    df = subjects_with_several_stays()
    df["split"] = assign_splits(df, (0.7, 0.15, 0.15), seed=3, stratify_col="ihm")
    assert (df.groupby("subject_id")["split"].nunique() > 1).any()


def test_one_stay_per_subject_gives_exactly_the_row_level_split():
    df = pd.DataFrame({"subject_id": [str(i) for i in range(200)], "ihm": np.arange(200) % 3 == 0})
    grouped = assign_splits(df, (0.6, 0.2, 0.2), 5, "ihm", group_col="subject_id")
    assert grouped.tolist() == assign_splits(df, (0.6, 0.2, 0.2), 5, "ihm").tolist()


def _synthetic_with_subjects(n: int = 60):
    stays, events, manifest = generate_synthetic(num_stays=n, seed=0)
    stays.insert(1, "subject_id", [f"p{i // 2}" for i in range(n)])  # two stays per subject
    return stays, events, manifest


def test_a_given_split_with_a_subject_in_two_splits_is_rejected_naming_the_subject(tmp_path):
    stays, events, manifest = _synthetic_with_subjects()
    stays["split"] = ["train", "val", "test"] * 20  # p0's stays 0 and 1: train and val
    with pytest.raises(FlexiModalError) as e:
        write_flexi(tmp_path / "out", stays, events, manifest)
    assert str(e.value) == (
        "stays (to write), row 1, column 'split': subject 'p0' is in split 'val' here and in "
        "'train' at row 0 (all stays of a subject must share one split)"
    )
    assert not (tmp_path / "out").exists()


def test_flexi_source_without_split_groups_the_subjects(tmp_path):
    stays, events, manifest = _synthetic_with_subjects()
    stays["split"] = assign_splits(stays, seed=0, group_col="subject_id")
    write_flexi(tmp_path / "mine", stays, events, manifest)
    table = pq.read_table(tmp_path / "mine" / "stays.parquet").drop_columns(["split"])
    pq.write_table(table, tmp_path / "mine" / "stays.parquet")
    data = {"source": "flexi", "flexi_dir": str(tmp_path / "mine"), "out_dir": str(tmp_path / "o")}
    prepare(data)
    out = pq.read_table(tmp_path / "o" / "stays.parquet").to_pandas()
    assert out["subject_id"].tolist() == stays["subject_id"].tolist()
    assert (out.groupby("subject_id")["split"].nunique() == 1).all()


def test_null_subject_id_is_rejected(tmp_path):
    stays, events, manifest = _synthetic_with_subjects()
    stays.loc[4, "subject_id"] = None
    with pytest.raises(FlexiModalError, match="row 4, column 'subject_id': missing"):
        write_flexi(tmp_path / "out", stays, events, manifest)
