"""train.use_best_params: the train stage takes the tune stage's best values, and only then."""

from __future__ import annotations

import pytest
import yaml

from pipelines.common import apply_best_params


def params(use: bool) -> dict:
    return {
        "model": {"num_experts": 8, "top_k": 2, "gate": "laplace", "d_model": 64},
        "train": {"lr": 0.001, "epochs": 8, "use_best_params": use},
    }


def write(path, obj) -> None:
    path.write_text(yaml.safe_dump(obj))


def test_best_params_override_only_the_tuned_keys(tmp_path):
    best = tmp_path / "best_params.yaml"
    write(best, {"model": {"num_experts": 4, "gate": "softmax"}, "train": {"lr": 0.002}})
    merged = apply_best_params(params(True), best)
    assert merged["model"] == {"num_experts": 4, "top_k": 2, "gate": "softmax", "d_model": 64}
    assert merged["train"]["lr"] == 0.002 and merged["train"]["epochs"] == 8


def test_switched_off_ignores_best_params(tmp_path):
    best = tmp_path / "best_params.yaml"
    write(best, {"model": {"num_experts": 4}})
    assert apply_best_params(params(False), best) == params(False)
    assert apply_best_params(params(False), tmp_path / "absent.yaml") == params(False)


def test_missing_best_params_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"absent\.yaml does not exist: run the tune stage"):
        apply_best_params(params(True), tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"deepspeed": {"zero_stage": 2}}, r"expected only 'model' and 'train' sections"),
        ({"model": {"num_expert": 4}}, r"model\.num_expert is not a params.yaml model key"),
        ({"train": 0.1}, r"section 'train' must be a mapping"),
    ],
)
def test_malformed_best_params_is_rejected_with_its_path(tmp_path, content, message):
    best = tmp_path / "best_params.yaml"
    write(best, content)
    with pytest.raises(SystemExit, match=message):
        apply_best_params(params(True), best)
