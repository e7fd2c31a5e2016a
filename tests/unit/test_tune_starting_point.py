import copy
from pathlib import Path

import pytest
import yaml

from ray_jobs.tune import starting_point

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def params() -> dict:
    return copy.deepcopy(yaml.safe_load(REPO_PARAMS.read_text()))


def test_default_params_are_the_first_point_of_the_default_search(params):
    point = starting_point(params)
    assert point == {
        "num_experts": params["model"]["num_experts"],
        "top_k": params["model"]["top_k"],
        "entropy_weight": float(params["model"]["entropy_weight"]),
        "gate": params["model"]["gate"],
        "lr": float(params["train"]["lr"]),
    }


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "num_experts", 32),  # not one of the listed choices
        ("model", "gate", "confidence"),
        ("model", "entropy_weight", 0.5),  # above the range's high end
        ("train", "lr", 1e-5),  # below the range's low end
    ],
)
def test_a_configuration_outside_the_space_is_not_tried(params, section, key, value):
    params[section][key] = value
    assert starting_point(params) is None
