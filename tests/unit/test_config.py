"""params.yaml's typed schema: every section, every stage, one line per bad value."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load, validate

REPO = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(section: str, key: str, value) -> dict:
    params = copy.deepcopy(SHIPPED)
    params[section][key] = value
    return params


def error_of(params: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate(params)
    return str(err.value)


def test_shipped_params_yaml_loads_every_section_with_its_values():
    params = load(REPO / "params.yaml")
    assert set(params) == {
        "data", "model", "train", "deepspeed", "ray", "tune", "mlflow", "registry"
    }  # fmt: skip
    for section, values in SHIPPED.items():
        for key, value in values.items():
            if not isinstance(value, dict):  # tune's {low, high, log} ranges gain log's default
                assert params[section][key] == value, f"{section}.{key}"
    assert params["tune"]["lr"] == {"low": 0.0003, "high": 0.003, "log": True}


def test_model_section_has_exactly_the_model_configs_fields():
    from dataclasses import fields

    from fusemoe.nn.model import FuseMoEConfig
    from pipelines.config import ModelConfig

    assert list(ModelConfig.model_fields) == [f.name for f in fields(FuseMoEConfig)]


def test_absent_keys_get_the_schema_defaults():
    params = validate({"model": {"num_experts": 4, "top_k": 2}, "deepspeed": {}})
    assert params["model"]["gate"] == "laplace" and params["model"]["experts_backend"] == "auto"
    assert params["deepspeed"] == {
        "zero_stage": 0, "precision": "fp32", "grad_clip": 1.0, "ep_size": 1,
        "torch_adam": True, "gradient_accumulation_steps": 1,
    }  # fmt: skip
    assert set(params) == {"model", "deepspeed"}  # sections not in the file are not invented
    assert validate({"registry": None})["registry"]["model_name"] == "fusemoe-ihm"  # `registry:`


@pytest.mark.parametrize(
    ("section", "key", "value", "line"),
    [
        ("train", "epochs", 2.7, "train.epochs = 2.7: expected an integer"),
        ("train", "use_best_params", "false", 'train.use_best_params = "false": expected true or false'),
        ("model", "moe", "no", 'model.moe = "no": expected true or false'),
        ("model", "top_k", 2.0, "model.top_k = 2.0: expected an integer"),
        ("model", "gate", "cosine", "model.gate = \"cosine\": expected one of 'softmax', 'laplace', 'gaussian' or 'confidence'"),
        ("model", "router", "shared", "model.router = \"shared\": expected one of 'joint', 'per_modality' or 'disjoint'"),
        ("train", "lr_schedule", "linear", "train.lr_schedule = \"linear\": expected one of 'constant' or 'cosine'"),
        ("deepspeed", "precision", "fp16", "deepspeed.precision = \"fp16\": expected one of 'fp32' or 'bf16'"),
        ("data", "source", "mimic", "data.source = \"mimic\": expected one of 'physionet2012', 'synthetic', 'flexi' or 'meds'"),
        ("data", "seed", "0", 'data.seed = "0": expected an integer'),
        ("ray", "num_workers", 0, "ray.num_workers = 0: expected >= 1"),
        ("ray", "use_gpu", 1, "ray.use_gpu = 1: expected true or false"),
        ("tune", "num_samples", 2.5, "tune.num_samples = 2.5: expected an integer"),
        ("mlflow", "system_metrics", "yes", 'mlflow.system_metrics = "yes": expected true or false'),
        ("registry", "max_ece", 2, "registry.max_ece = 2: expected <= 1"),
        ("registry", "min_improvement", "0.01x", 'registry.min_improvement = "0.01x": expected a number'),
        ("tune", "entropy_weight", {"low": 0.0, "high": float("nan")}, "tune.entropy_weight.high = NaN: expected a finite number"),
    ],
)  # fmt: skip
def test_wrong_type_or_value_names_section_key_value_and_expectation(section, key, value, line):
    assert error_of(with_value(section, key, value)) == line


@pytest.mark.parametrize(
    ("section", "key", "line"),
    [
        ("train", "epohcs", "train.epohcs = 1: unknown key (did you mean epochs?)"),
        ("model", "num_expert", "model.num_expert = 1: unknown key (did you mean num_experts?)"),
        ("data", "raw_dirs", "data.raw_dirs = 1: unknown key (did you mean raw_dir?)"),
        ("deepspeed", "zero", "deepspeed.zero = 1: unknown key (did you mean zero_stage?)"),
        ("ray", "adress", "ray.adress = 1: unknown key (did you mean address?)"),
        ("tune", "num_sample", "tune.num_sample = 1: unknown key (did you mean num_samples?)"),
        ("mlflow", "experiment_name", "mlflow.experiment_name = 1: unknown key (did you mean experiment?)"),
        ("registry", "metrics", "registry.metrics = 1: unknown key (did you mean metric?)"),
    ],
)  # fmt: skip
def test_unknown_key_in_any_section_is_named_with_the_likely_intended_one(section, key, line):
    assert error_of(with_value(section, key, 1)) == line


def test_misspelt_section_is_an_error_not_a_silently_missing_section():
    params = copy.deepcopy(SHIPPED)
    params["trian"] = params.pop("train")
    assert error_of(params) == "trian: unknown section (did you mean train?)"


@pytest.mark.parametrize(
    ("section", "key", "value", "line"),
    [
        ("data", "split", [0.7, 0.2, 0.2], "data.split = [0.7, 0.2, 0.2]: train/val/test fractions must sum to 1 (they sum to 1.1)"),
        ("data", "split", [0.7, 0.3], "data.split = [0.7, 0.3]: expected at least 3 item(s)"),
        ("train", "modality_dropout", 1.5, "train.modality_dropout = 1.5: expected < 1"),
        ("train", "primary_metric", "val_wobble_ihm", "train.primary_metric = \"val_wobble_ihm\": metric 'val_wobble_ihm': unknown direction"),
        ("model", "top_k", 16, "model.top_k=16 must be in [1, 8]"),
        ("model", "n_heads", 3, "model.d_model=64 not divisible by n_heads=3"),
        ("deepspeed", "zero_stage", 3, "deepspeed.zero_stage=3: use 0, 1 or 2 (ZeRO-3 does not support MoE)"),
        ("tune", "top_k", [1, 8], "tune: invalid tune search space: top_k > num_experts for num_experts=4 with top_k=8"),
        ("tune", "lr", {"low": 1e-2, "high": 1e-3}, 'tune.lr = {"low": 0.01, "high": 0.001}: low 0.01 is above high 0.001'),
        ("tune", "lr", {"low": 1e-3, "hi": 1e-2}, "tune.lr.high: missing (required); tune.lr.hi = 0.01: unknown key (did you mean high?)"),
        ("tune", "lr", 0.001, "tune.lr = 0.001: expected a list of values or a {low, high, log} range"),
        ("train", "batch_size", 63, "train.batch_size=63 is not divisible by ray.num_workers (2)"),
    ],
)  # fmt: skip
def test_ranges_and_cross_field_rules(section, key, value, line):
    assert error_of(with_value(section, key, value)).startswith(line)


@pytest.mark.parametrize("metric", ["val_mae_los_days", "val_loss", "eval_val_auroc_ihm"])
def test_primary_metric_must_be_one_the_training_loop_reports(metric):
    # tasks [ihm]: the loop reports val_<metric>_ihm only; nothing else could be compared.
    line = error_of(with_value("train", "primary_metric", metric))
    assert line.startswith(f'train.primary_metric = "{metric}": expected a validation metric')


def test_lower_is_better_primary_metric_of_a_trained_task_is_accepted():
    params = with_value("train", "primary_metric", "val_mae_los_days")
    params["train"]["tasks"] = ["ihm", "los_days"]
    assert validate(params)["train"]["primary_metric"] == "val_mae_los_days"


def test_numbers_yaml_reads_as_text_are_numbers_and_ints_are_fine_for_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; a user means a number.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 0\n")
    train = load(path, ("train",))["train"]
    assert train["lr"] == 0.001 and train["weight_decay"] == 0.0


def test_every_problem_is_on_the_one_line():
    params = with_value("train", "epochs", 2.7)
    params["model"]["gate"] = "cosine"
    line = error_of(params)
    assert "\n" not in line and "train.epochs = 2.7" in line and 'model.gate = "cosine"' in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: [1, 2\n", "not valid YAML at line 2"),
        ("- 1\n- 2\n", "missing section(s) ['train']"),
        ("model: {}\n", "missing section(s) ['train']"),
    ],
)
def test_unreadable_or_incomplete_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path, ("train",))
    assert str(err.value) == f"{path}: {message}"


# ---------------------------------------------------------------- every stage goes through it

BAD_LINE = "error: params.yaml: train.epochs = 2.7: expected an integer"


def stage_mains():
    from pipelines import cli, evaluate, prepare, register, train, tune

    return {
        "prepare": prepare.main,
        "train": train.main,
        "evaluate": evaluate.main,
        "register": register.main,
        "tune": tune.main,
        "fusemoe promote": lambda: cli.main(["promote", "1"]),
        "fusemoe rollback": lambda: cli.main(["rollback"]),
    }


@pytest.fixture
def bad_project(tmp_path, monkeypatch):
    """A project folder whose params.yaml has one wrong type (in a section every stage reads or
    in one it does not: the whole file is checked)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value("train", "epochs", 2.7)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stage"])
    return tmp_path


@pytest.mark.parametrize(
    "stage",
    ["prepare", "train", "evaluate", "register", "tune", "fusemoe promote", "fusemoe rollback"],
)
def test_every_stage_stops_on_a_bad_params_file_with_one_line_and_writes_nothing(
    bad_project, stage, capsys
):
    with pytest.raises(SystemExit) as exit_:
        code = stage_mains()[stage]()
        raise SystemExit(code)  # prepare returns its exit status
    if isinstance(exit_.value.code, str):  # sys.exit("message"): printed to stderr, status 1
        assert exit_.value.code == BAD_LINE
    else:
        assert exit_.value.code == 1 and capsys.readouterr().err == BAD_LINE + "\n"
    assert [p.name for p in bad_project.iterdir()] == ["params.yaml"]


def test_stage_process_prints_the_line_and_exits_1(bad_project):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (1, BAD_LINE + "\n", "")
    assert [p.name for p in bad_project.iterdir()] == ["params.yaml"]
