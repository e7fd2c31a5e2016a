"""deepspeed_config turns params.yaml's deepspeed section into a DeepSpeed config."""

import pytest

from fusemoe.parallel.engine import deepspeed_config


def test_config_carries_zero_stage_precision_clipping_and_adamw():
    cfg = deepspeed_config(
        {"zero_stage": 2, "precision": "bf16", "grad_clip": 1.0, "ep_size": 2}, 64, 1e-3, 1e-4
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 64
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["optimizer"]["params"]["weight_decay"] == 1e-4


def test_fp32_is_the_default_precision():
    cfg = deepspeed_config({}, 8, 1e-3, 0.0)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("bad", [{"zero_stage": 3}, {"precision": "fp16"}, {"ep_size": 0}], ids=str)
def test_unsupported_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        deepspeed_config(bad, 8, 1e-3, 0.0)
