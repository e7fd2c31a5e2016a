"""deepspeed_config turns params.yaml's deepspeed section into a config DeepSpeed itself accepts
and reads back as meant (checked with DeepSpeed's own parser, ``DeepSpeedConfig``)."""

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from fusemoe.loop import _init_distributed
from fusemoe.parallel.engine import deepspeed_config, loop_clips


def parsed(ds_params: dict, micro: int = 8, lr: float = 1e-3, wd: float = 0.0) -> DeepSpeedConfig:
    """DeepSpeed's own reading of our config (one process: data-parallel width 1)."""
    return DeepSpeedConfig(deepspeed_config(ds_params, micro, lr, wd))


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_reads_back_stage_precision_clipping_and_adamw(stage, precision):
    ds = parsed({"zero_stage": stage, "precision": precision, "grad_clip": 0.7}, lr=3e-4, wd=0.02)
    assert ds.zero_optimization_stage == stage
    assert ds.bfloat16_config.enabled is (precision == "bf16")
    assert not ds.float16_config.enabled  # never fp16: no loss scaling anywhere
    # fp32 without ZeRO: the loop clips (loop_clips), so DeepSpeed must not clip a second time
    assert ds.gradient_clipping == (0.0 if (stage, precision) == (0, "fp32") else 0.7)
    assert ds.optimizer_name == "adamw"
    assert ds.optimizer_params["lr"] == 3e-4 and ds.optimizer_params["weight_decay"] == 0.02
    assert ds.optimizer_params["torch_adam"] is True  # no JIT-built fused op on CPU


def test_torch_adamw_is_the_fused_one_and_deepspeeds_fused_adam_gets_no_torch_flag():
    assert parsed({}).optimizer_params["fused"] is True  # torch's CPU default is the loop
    assert "fused" not in parsed({"torch_adam": False}).optimizer_params


@pytest.mark.parametrize(
    ("ds_params", "loop"),
    [
        ({"grad_clip": 1.0}, True),
        ({"grad_clip": 0.0}, False),  # nothing to clip
        ({"grad_clip": 1.0, "zero_stage": 1}, False),  # ZeRO holds the gradient partitions
        ({"grad_clip": 1.0, "precision": "bf16"}, False),  # the bf16 optimizer clips fp32 copies
        ({"grad_clip": 1.0, "ep_size": 2}, False),  # expert shards: a norm over the EP group
    ],
    ids=str,
)
def test_the_loop_clips_only_where_deepspeeds_clip_adds_nothing(ds_params, loop):
    assert loop_clips(ds_params) is loop
    assert parsed(ds_params).gradient_clipping == (0.0 if loop else ds_params["grad_clip"])


def test_torch_multi_tensor_clip_scales_gradients_as_deepspeeds_clip_does():
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip

    _init_distributed("gloo")  # DeepSpeed's clip averages the norm over the data-parallel group
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    model(torch.randn(32, 8)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
    clipped = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    ds_norm = deepspeed_clip(model.parameters(), 0.5)
    assert torch_norm > 0.5  # the clip is active
    assert torch.allclose(torch_norm, ds_norm.reshape(()))
    for p, c in zip(model.parameters(), clipped, strict=True):
        assert torch.allclose(p.grad, c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_settings_satisfy_deepspeed_moe(stage):
    """ZeRO-2 with MoE layers asserts contiguous gradients and reduce-scatter at engine start."""
    zero = parsed({"zero_stage": stage}).zero_config
    assert zero.contiguous_gradients and zero.reduce_scatter


@pytest.mark.parametrize(("micro", "accum"), [(8, 1), (64, 2), (16, 3)])
def test_train_batch_is_micro_batch_times_accumulation(micro, accum):
    """DeepSpeed derives the global batch (x data-parallel width, 1 here) and asserts it is
    consistent; the config never states it, so it cannot contradict the other two."""
    ds = parsed({"gradient_accumulation_steps": accum}, micro=micro)
    assert ds.train_micro_batch_size_per_gpu == micro
    assert ds.gradient_accumulation_steps == accum
    assert ds.train_batch_size == micro * accum


def test_defaults_are_fp32_zero_0_and_no_clipping():
    ds = parsed({})
    assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_optimization_stage == 0
    assert ds.gradient_clipping == 0.0


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        ({"zero_stage": 3}, "deepspeed.zero_stage=3"),  # DeepSpeed refuses MoE under ZeRO-3
        ({"precision": "fp16"}, "deepspeed.precision='fp16'"),
        ({"ep_size": 0}, "deepspeed.ep_size=0"),
    ],
    ids=str,
)
def test_unsupported_settings_are_rejected_naming_the_field(bad, names):
    with pytest.raises(ValueError, match=names.replace("[", r"\[")):
        deepspeed_config(bad, 8, 1e-3, 0.0)
