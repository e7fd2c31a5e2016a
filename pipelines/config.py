"""The typed schema of params.yaml: one class per section, its defaults, and one-line errors.

Every stage and the ``fusemoe`` CLI load params through :func:`load` (``pipelines.common.
load_params``), so an unknown key, a typo or a wrong type in any section stops the run before it
starts, with one line naming the section, key, value and what was expected::

    params.yaml: train.epochs = 2.7: expected an integer

Types are strict: YAML's ``2.7`` is not an integer and ``"false"`` is not a boolean (an integer
is a fine number). Validation returns plain dicts with every default filled in, so the stages keep
reading ``params["train"]["epochs"]``. Rules that the library code already owns are not restated:
the model's cross-field checks are FuseMoEConfig's, the DeepSpeed ones ``deepspeed_config``'s, the
search-space ones ``ray_jobs.tune.validate_space``'s; the schema calls them.

To add a key: add a field (with a comment) to its section's class; its default is the value a
params file without the key gets.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from fusemoe.data.schema import TASK_KINDS
from fusemoe.loop import LR_SCHEDULES
from fusemoe.metrics import higher_is_better
from fusemoe.nn.experts import Backend
from fusemoe.nn.gates import GATE_TYPES
from fusemoe.nn.model import FuseMoEConfig
from fusemoe.nn.moe import BALANCE_SCOPES, ROUTER_TYPES
from fusemoe.parallel.engine import PRECISIONS, deepspeed_config, per_rank_batch

DATA_SOURCES = ("physionet2012", "synthetic", "flexi", "meds")


class ConfigError(ValueError):
    """A params file that does not match the schema; the message is one line."""


# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; YAML 1.2 and every user read it as
# a number. Such a string is accepted for a float field, nothing else is converted.
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _yaml12_number(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_yaml12_number)]
PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]  # 0 has a meaning (e.g. "all")
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Strict types, no unknown keys, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _known_metric(metric: str) -> str:
    higher_is_better(metric)  # the one definition of a metric's direction; unknown names fail
    return metric


Metric = Annotated[str, AfterValidator(_known_metric)]  # a logged metric key with a direction


# ---------------------------------------------------------------- data


class SyntheticConfig(Section):
    num_stays: PositiveInt = 2000
    seed: int = 0
    missingness: dict[str, Fraction] | None = None  # modality -> probability a stay lacks it
    # > 0: an embedding modality `note` of this width that the ihm label needs (0 = none)
    note_width: Annotated[int, Field(ge=0)] = 0


class MedsConfig(Section):
    """source=meds: a MEDS dataset + label file -> FlexiModal (fusemoe/data/meds.py's rules)."""

    dataset_dir: str = "data/meds"  # data/*.parquet shards + metadata/ (must exist for DVC)
    labels: str = "data/meds_labels"  # a MEDS label Parquet file or a directory of them
    task: str = "outcome"  # the task's name in the manifest (train.tasks names it)
    task_kind: Literal[TASK_KINDS] = "binary"  # label column: boolean/float/integer_value;
    # multilabel: categorical_value (label name) + boolean_value, one row per label
    num_classes: Annotated[int, Field(ge=2)] | None = None  # multiclass: integer_value 0..n-1
    classes: list[str] = []  # multilabel label names in output order ([] = sorted names seen)
    modalities: Annotated[dict[str, str], Field(min_length=1)] = {
        "LAB//": "labs",
        "VITAL//": "vitals",
    }  # code prefix -> series modality; the longest matching prefix wins
    static_prefixes: list[str] = ["STATIC//"]  # static codes (plus every event with a null time)
    window_h: PositiveFloat = 48.0  # observation window: the window_h hours up to prediction_time
    unmatched_codes: Literal["count", "error"] = "count"  # codes matching no prefix

    @model_validator(mode="after")
    def _task_rules(self) -> MedsConfig:
        if self.task_kind == "multiclass" and self.num_classes is None:
            raise ValueError("data.meds.num_classes must be set when task_kind is multiclass")
        if "static" in self.modalities.values():
            raise ValueError("data.meds.modalities: 'static' is the static modality's name")
        return self


class DataConfig(Section):
    source: Literal[DATA_SOURCES] = "physionet2012"
    raw_dir: str = ""  # a local P12 mirror, copied when it exists; env FUSEMOE_DATA_DIR overrides
    physionet_url: str = "https://physionet.org/files/challenge-2012/1.0.0/"  # when no mirror
    download_dir: str = "data/raw/physionet2012"  # the verified, DVC-tracked copy prepare reads
    verify_digests: bool = True  # false accepts modified copies of the published files
    flexi_dir: str = "data/flexi"  # source=flexi: a FlexiModal directory (must exist for DVC)
    out_dir: str = "data/processed"
    split: Annotated[list[Fraction], Field(min_length=3, max_length=3)] = [0.7, 0.15, 0.15]
    seed: int = 0
    los_threshold_days: PositiveFloat = 7.0
    synthetic: SyntheticConfig = SyntheticConfig()
    meds: MedsConfig = MedsConfig()

    @field_validator("split")
    @classmethod
    def _sums_to_one(cls, split: list[float]) -> list[float]:
        if abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must sum to 1 (they sum to {sum(split):g})")
        return split


# ---------------------------------------------------------------- model

_M = FuseMoEConfig()  # the model's defaults live in fusemoe/nn/model.py


class ModelConfig(Section):
    """FuseMoEConfig's fields (fusemoe/nn/model.py documents each); its checks run on the result."""

    d_model: PositiveInt = _M.d_model
    n_heads: PositiveInt = _M.n_heads
    n_layers: PositiveInt = _M.n_layers
    num_ref_points: PositiveInt = _M.num_ref_points
    num_experts: PositiveInt = _M.num_experts
    top_k: PositiveInt = _M.top_k
    expert_hidden: PositiveInt = _M.expert_hidden
    gate: Literal[GATE_TYPES] = _M.gate
    router: Literal[ROUTER_TYPES] = _M.router
    gate_noise: NonNegativeFloat = _M.gate_noise
    moe: bool = _M.moe
    dropout: Annotated[Float, Field(ge=0, lt=1)] = _M.dropout
    load_balance_weight: NonNegativeFloat = _M.load_balance_weight
    entropy_weight: NonNegativeFloat = _M.entropy_weight
    balance_scope: Literal[BALANCE_SCOPES] = _M.balance_scope  # expert_set | router
    confidence_weight: NonNegativeFloat = _M.confidence_weight
    time_horizon_h: PositiveFloat = _M.time_horizon_h
    count_features: bool = _M.count_features
    summary_token: bool = _M.summary_token
    experts_backend: Backend = _M.experts_backend
    value_clip: NonNegativeFloat = _M.value_clip  # 0 = off

    @model_validator(mode="after")
    def _model_rules(self) -> ModelConfig:
        FuseMoEConfig(**self.model_dump())  # divisibility, top_k <= num_experts
        return self


# ---------------------------------------------------------------- train


class TrainConfig(Section):
    tasks: Annotated[list[str], Field(min_length=1)] = ["ihm"]  # task names from the manifest
    primary_metric: Metric = "val_auroc_ihm"  # selects checkpoints and tune trials
    epochs: PositiveInt = 8
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    warmup_epochs: NonNegativeFloat = 0.0  # linear warmup, in epochs (fractions allowed)
    weight_decay: NonNegativeFloat = 1e-4
    seed: int = 0
    max_train_stays: Count = 0  # 0 = all
    modality_dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    # Loss weight of a task (default 1), e.g. {los_days: 0.3} for an auxiliary task.
    task_weights: dict[str, PositiveFloat] = {}
    bucket_by_length: bool = False  # batches of similar length (less padding, other metrics)
    ema_decay: Annotated[Float, Field(ge=0, lt=1)] = (
        0.0  # EMA of the weights, validated and saved; 0 = off
    )
    use_best_params: bool = False  # lay the tune stage's best_params.yaml over model/train
    run_name: str = "fusemoe"
    checkpoint_dir: str = "runs/train"

    @model_validator(mode="after")
    def _primary_is_reported(self) -> TrainConfig:
        # The loop reports val_<metric>_<task> per trained task; any other key never appears, and
        # checkpoint scoring and the search would find nothing to compare.
        unknown = sorted(set(self.task_weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"train.task_weights: {unknown} not in train.tasks {self.tasks}")
        m = self.primary_metric
        if not (m.startswith("val_") and any(m.endswith(f"_{t}") for t in self.tasks)):
            raise ValueError(
                f"train.primary_metric = {_show(m)}: expected a validation metric of a trained "
                f"task, val_<metric>_<task> with <task> in train.tasks {self.tasks}"
            )
        return self


# ---------------------------------------------------------------- deepspeed


class DeepSpeedConfig(Section):
    """fusemoe.parallel.engine.deepspeed_config's keys; it checks their values."""

    zero_stage: Count = 0
    precision: Literal[PRECISIONS] = "fp32"
    grad_clip: NonNegativeFloat = 1.0  # 0 = off
    ep_size: PositiveInt = 1  # expert-parallel group size
    torch_adam: bool = True
    gradient_accumulation_steps: PositiveInt = 1

    @model_validator(mode="after")
    def _engine_rules(self) -> DeepSpeedConfig:
        deepspeed_config(self.model_dump(), micro_batch_size=1, lr=1e-3, weight_decay=0.0)
        return self


# ---------------------------------------------------------------- ray


class RayConfig(Section):
    address: str = ""  # env RAY_ADDRESS overrides; "" = a local embedded Ray
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    num_cpus: PositiveInt = 2  # local Ray only
    max_failures: Annotated[int, Field(ge=-1)] = 1  # -1 = retry forever (Ray's convention)
    keep_checkpoints: PositiveInt = 2
    storage_path: str = "runs/ray"


# ---------------------------------------------------------------- tune


class Range(Section):
    """A (log-)uniform range of a searched knob."""

    low: Float
    high: Float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        return self


# A searched number: a list is a categorical choice, {low, high, log} a range. The tags name the
# branch so an error reports only the one the value was meant for (they are left out of its key).
Knob = Annotated[
    Annotated[list[Float], Tag("<list>")] | Annotated[Range, Tag("<range>")],
    Discriminator(lambda v: "<range>" if isinstance(v, dict | Range) else "<list>"),
]


class TuneConfig(Section):
    """Budget and search space; ray_jobs.tune.validate_space checks the space's semantics."""

    name: str = "fusemoe-tune"  # Ray experiment name prefix, under ray.storage_path
    num_samples: PositiveInt = 4
    max_epochs: PositiveInt = 3  # per trial; ASHA's max_t
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[Float, Field(gt=1)] = 2.0
    max_train_stays: Count = 0  # 0 = all
    max_concurrent_trials: PositiveInt = 1
    trial_workers: PositiveInt = 1  # 1 = train inside the trial process
    cpus_per_trial: PositiveFloat = 1.0
    seed: int = 0
    num_experts: Annotated[list[PositiveInt], Field(min_length=1)] = [4, 8, 16]
    top_k: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4]
    entropy_weight: Knob = [0.01]
    gate: Annotated[list[str], Field(min_length=1)] = ["softmax", "laplace", "gaussian"]
    lr: Knob = [1e-3]

    @model_validator(mode="after")
    def _space_rules(self) -> TuneConfig:
        from ray_jobs.tune import validate_space  # imports no Ray

        validate_space(self.model_dump())
        return self


# ---------------------------------------------------------------- mlflow, registry


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # env MLFLOW_TRACKING_URI overrides
    experiment: str = "fusemoe"
    system_metrics: bool = True


class RegistryConfig(Section):
    model_name: str = "fusemoe-ihm"
    metric: Metric = "eval_val_auroc_ihm"  # compared between challenger and champion
    min_improvement: NonNegativeFloat = 0.0
    max_ece: Fraction = 0.2


# ---------------------------------------------------------------- the file


class Params(Section):
    """A params file: every section optional here; a stage names the ones it needs."""

    data: DataConfig | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    deepspeed: DeepSpeedConfig | None = None
    ray: RayConfig | None = None
    tune: TuneConfig | None = None
    mlflow: MlflowConfig | None = None
    registry: RegistryConfig | None = None

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> Params:
        """``train.batch_size`` is the global batch, split evenly over the training workers."""
        if self.train is None:
            return self
        workers = {"ray.num_workers": self.ray.num_workers if self.ray else 1}
        if self.tune is not None:
            workers["tune.trial_workers"] = self.tune.trial_workers
        for key, n in workers.items():
            per_rank_batch(self.train.batch_size, n, key)
        return self


def validate(raw: Any) -> dict[str, dict]:
    """Every section of ``raw`` checked and completed with defaults; raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections, got {_show(raw)}")
    raw = {k: {} if v is None else v for k, v in raw.items()}  # `registry:` alone = defaults
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(err) for err in e.errors())) from None
    return params.model_dump(exclude_none=True, include=set(raw))


def load(path: str | Path = "params.yaml", sections: tuple[str, ...] = ()) -> dict[str, dict]:
    """The requested sections of a params file (all when none are named), validated.

    Raises ConfigError whose message starts with the file's path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    missing = [s for s in sections if not isinstance(raw, dict) or s not in raw]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {missing}")
    try:
        params = validate(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {s: params[s] for s in sections} if sections else params


# ---------------------------------------------------------------- error lines

_EXPECTED = {
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "missing": "missing (required)",
    "finite_number": "expected a finite number",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _describe(err: dict) -> str:
    """One pydantic error as ``section.key = value: what was expected``."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("<"))]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_keys(err["loc"][:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
        if len(loc) == 1:
            return f"{where}: unknown section{hint}"
        return f"{where} = {_show(err['input'])}: unknown key{hint}"
    if kind in ("value_error", "assertion_error"):
        what = str(ctx.get("error", err["msg"]))
    elif kind == "literal_error":
        what = f"expected one of {ctx['expected']}"
    elif kind in ("too_short", "too_long"):
        what = f"expected {'at least' if kind == 'too_short' else 'at most'} "
        what += f"{ctx.get('min_length', ctx.get('max_length'))} item(s)"
    elif any(b in ctx for b in _BOUNDS):
        what = "expected " + " and ".join(f"{op} {ctx[b]}" for b, op in _BOUNDS.items() if b in ctx)
    else:
        what = _EXPECTED.get(kind, err["msg"])
    if kind == "list_type" and "<list>" in err["loc"]:
        what = "expected a list of values or a {low, high, log} range"
    if not loc and kind in ("value_error", "assertion_error"):  # a rule across sections
        return what
    if len(loc) == 1 and kind in ("value_error", "assertion_error"):  # a whole section's rule
        return what if what.startswith(f"{where}.") else f"{where}: {what}"
    if kind == "missing":
        return f"{where}: {what}"
    return f"{where} = {_show(err['input'])}: {what}"


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML/JSON terms (strings quoted, so "false" is visible)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _known_keys(loc: tuple) -> list[str]:
    """The field names of the schema class found at ``loc``."""
    cls: Any = Params
    for part in loc:
        if isinstance(part, int) or part.startswith("<"):
            continue
        cls = _section_class(cls.model_fields[part].annotation)
    return list(cls.model_fields)


def _section_class(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None
