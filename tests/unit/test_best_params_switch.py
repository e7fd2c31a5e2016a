"""train.use_best_params: the train stage takes the tune stage's best values, and only then."""

from __future__ import annotations

import pytest
import yaml

from pipelines.common import apply_best_params
from pipelines.config import validate


def params(use: bool) -> dict:
    """As load_params returns them: validated, defaults filled."""
    return validate(
        {
            "model": {"num_experts": 8, "top_k": 2, "gate": "laplace", "d_model": 64},
            "train": {"lr": 0.001, "epochs": 8, "use_best_params": use},
        }
    )


def write(path, obj) -> None:
    path.write_text(yaml.safe_dump(obj))


def test_best_params_override_only_the_tuned_keys(tmp_path):
    best = tmp_path / "best_params.yaml"
    write(best, {"model": {"num_experts": 4, "gate": "softmax"}, "train": {"lr": 0.002}})
    merged = apply_best_params(params(True), best)
    assert merged["model"] == params(True)["model"] | {"num_experts": 4, "gate": "softmax"}
    assert merged["train"] == params(True)["train"] | {"lr": 0.002}


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
        ({"model": {"num_expert": 4}}, r"model\.num_expert = 4: unknown key"),
        ({"train": 0.1}, r"section 'train' must be a mapping"),
        ({"model": {"top_k": 2.5}}, r"model\.top_k = 2\.5: expected an integer"),
        ({"model": {"gate": "cosine"}}, r"model\.gate = \"cosine\": expected one of"),
        ({"model": {"top_k": 16}}, r"model\.top_k=16 must be in \[1, 8\]"),
    ],
)
def test_malformed_best_params_is_rejected_with_its_path(tmp_path, content, message):
    best = tmp_path / "best_params.yaml"
    write(best, content)
    with pytest.raises(SystemExit, match=message) as err:
        apply_best_params(params(True), best)
    assert str(err.value).startswith(f"error: {best}")
