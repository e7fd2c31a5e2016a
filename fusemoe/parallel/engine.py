"""DeepSpeed engine configuration from params.yaml's ``deepspeed`` section.

Plain dict building, no deepspeed import, so the training loop can use it on any machine.
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("fp32", "bf16")


def deepspeed_config(
    ds_params: dict[str, Any], micro_batch_size: int, lr: float, weight_decay: float
) -> dict[str, Any]:
    """The ``config`` for ``deepspeed.initialize``.

    ``ds_params`` keys: ``zero_stage`` (0-2; ZeRO-3 refuses MoE layers), ``precision``
    (fp32 | bf16; fp16 is never used: loss scaling buys nothing over bf16 on current GPUs),
    ``grad_clip`` (0 = off), ``ep_size`` (read by ``apply_expert_parallel``, not by DeepSpeed),
    optional ``torch_adam`` (default true: ``torch.optim.AdamW``, which needs no JIT-built op on
    CPU; false picks DeepSpeed's fused Adam on GPU) and ``gradient_accumulation_steps``.
    """
    stage = int(ds_params.get("zero_stage", 0))
    if stage not in (0, 1, 2):
        raise ValueError(
            f"deepspeed.zero_stage={stage}: use 0, 1 or 2 (ZeRO-3 does not support MoE)"
        )
    precision = ds_params.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"deepspeed.precision={precision!r}: use one of {PRECISIONS}")
    ep_size = int(ds_params.get("ep_size", 1))
    if ep_size < 1:
        raise ValueError(f"deepspeed.ep_size={ep_size} must be >= 1")
    torch_adam = bool(ds_params.get("torch_adam", True))
    # torch's AdamW defaults to its per-parameter loop on CPU; the fused one (CPU and CUDA) is the
    # same update in one kernel per parameter, a third of the step time of the multi-tensor one
    # on P12 (DeepSpeed passes `fused` on only to torch's AdamW).
    adam_kwargs = {"torch_adam": True, "fused": True} if torch_adam else {"torch_adam": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(ds_params.get("gradient_accumulation_steps", 1)),
        "gradient_clipping": 0.0 if loop_clips(ds_params) else grad_clip(ds_params),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                **adam_kwargs,
            },
        },
        "zero_optimization": {
            "stage": stage,
            # DeepSpeed MoE requires these two with ZeRO-2 and recommends them for ZeRO-1.
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config


def per_rank_batch(batch_size: int, workers: int, what: str = "the training workers") -> int:
    """``train.batch_size`` is the global batch (stays per optimizer step): each of `workers`
    data-parallel ranks runs its share, so adding workers keeps the update rule."""
    if batch_size % workers:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by {what} ({workers}): "
            f"each worker runs batch_size / workers stays a step"
        )
    return batch_size // workers


def grad_clip(ds_params: dict[str, Any]) -> float:
    return float(ds_params.get("grad_clip", 0.0))


def loop_clips(ds_params: dict[str, Any]) -> bool:
    """Whether the training loop clips the gradient norm itself, not DeepSpeed: in fp32 without
    ZeRO or expert parallelism, where DeepSpeed's clip is a Python loop over the parameters (a
    third of an optimizer step on P12's CPU profile) and torch's multi-tensor clip computes the
    same norm. ZeRO partitions, bf16 master weights and expert shards need DeepSpeed's own."""
    return grad_clip(ds_params) > 0 and plain_data_parallel(ds_params)


def plain_data_parallel(ds_params: dict[str, Any]) -> bool:
    """fp32 weights replicated on every rank: no ZeRO partitions, no expert shards."""
    return (
        int(ds_params.get("zero_stage", 0)) == 0
        and ds_params.get("precision", "fp32") == "fp32"
        and int(ds_params.get("ep_size", 1)) == 1
    )
