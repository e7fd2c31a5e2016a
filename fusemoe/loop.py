"""The one training loop for FuseMoE: CPU or GPU, a single process or one rank of many.

The loop drives a DeepSpeed engine (ZeRO 0-2, optional expert parallelism) and knows nothing about
Ray or MLflow: the caller passes `report(metrics, checkpoint_dir)` and, when resuming, the directory
of the last checkpoint. Every rank saves its part of the DeepSpeed checkpoint into its own directory
before calling `report`, so an orchestrator can merge and persist them (Ray Train does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from fusemoe.data.dataset import (
    RANK_SEED_STRIDE,
    Batches,
    DataSpec,
    FlexiModalDataset,
    ShardBatches,
    as_batch,
    batch_to,
    dataset_spec,
    drop_modalities,
    length_batches,
    standardise_regression,
)
from fusemoe.data.flexi import load_manifest
from fusemoe.inference import merge_predictions, predict
from fusemoe.metrics import task_metrics
from fusemoe.model_io import build_model, save_model
from fusemoe.nn.losses import task_loss
from fusemoe.parallel import shm_allreduce

STATE_FILE = "train_state.json"
# The EMA of the weights (train.ema_decay > 0), one file per rank (expert-parallel ranks hold
# different experts), so a resumed run averages on exactly where it stopped.
EMA_FILE = "ema_rank{rank}.pt"

Report = Callable[[dict, Path], None]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    ``constant``: 1 after a linear warmup. ``cosine``: linear warmup, then a half cosine from 1
    down to 0.05 at ``total_steps``, so late epochs take small steps instead of overfitting.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, tcfg: dict, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``train.lr_schedule`` / ``train.warmup_epochs`` schedule over ``train.epochs``."""
    total = int(tcfg["epochs"]) * steps_per_epoch
    schedule = str(tcfg.get("lr_schedule", "constant"))
    warmup = int(float(tcfg.get("warmup_epochs", 0)) * steps_per_epoch)
    lr_factor(0, total, schedule, warmup)  # an unknown name fails here, before any training
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, schedule, warmup)
    )


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s parameters, updated after every optimizer step
    (``ema = decay * ema + (1 - decay) * weights``; the first update copies the weights), or None
    for ``decay == 0``. Validation and the saved model use it: averaging the late steps smooths
    the epoch-to-epoch noise of the validation metric that picking one epoch would keep."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay={decay}: expected 0 (off) or a decay in (0, 1)")
    if decay == 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def select_tasks(spec: DataSpec, names: list[str]) -> DataSpec:
    """Restrict a dataset's tasks to those being trained, with a clear error for unknown names."""
    known = {t.name: t for t in spec.tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"params.yaml train.tasks: unknown task(s) {unknown}; dataset has {sorted(known)}"
        )
    return dataclasses.replace(spec, tasks=[known[n] for n in names])


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _init_distributed(backend: str) -> None:
    """DeepSpeed needs a process group; a lone process gets a one-rank group on 127.0.0.1."""
    if not dist.is_initialized() and os.environ.get("WORLD_SIZE", "1") == "1":
        # A lone process (e.g. a Tune trial): its own one-rank group on a free loopback port, never
        # a MASTER_PORT inherited from whatever started this process.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    shm_allreduce.init_distributed(backend)


def train(cfg: dict, report: Report, restore_dir: Path | None = None, log=print) -> dict:
    """Trains for `cfg["train"]["epochs"]` epochs, resuming from `restore_dir` when given.

    cfg holds `data_dir` and the params.yaml sections `model`, `train`, `deepspeed`.
    Returns {"metrics": last epoch's metrics, "history": every epoch's metrics}.
    """
    import deepspeed

    from fusemoe.parallel.engine import (
        deepspeed_config,
        grad_clip,
        loop_clips,
        per_rank_batch,
        plain_data_parallel,
    )

    tcfg, dcfg = cfg["train"], cfg["deepspeed"]
    use_cuda = torch.cuda.is_available() and cfg.get("use_gpu", False)
    _init_distributed("nccl" if use_cuda else "gloo")
    rank, world = _rank(), _world()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    set_seed(int(tcfg["seed"]))

    data_dir = str(cfg["data_dir"])  # a local path or a pyarrow URI (s3://...)
    spec = select_tasks(dataset_spec(load_manifest(data_dir)), list(tcfg["tasks"]))
    spec = standardise_regression(spec, data_dir)  # saved with the model: it outputs days again
    task_weights = dict(tcfg.get("task_weights") or {})
    # Each rank reads only its shard of the training stays.
    train_ds = FlexiModalDataset(
        data_dir,
        "train",
        max_stays=int(tcfg.get("max_train_stays", 0)),
        shard=(rank, world),
    )
    # Validation is split over the ranks and the predictions gathered (a sample's prediction
    # does not depend on its batch, so the metrics are the whole split's). With sharded experts
    # every rank must run the same all-to-alls, so each scores the whole split instead.
    ep_size = int(dcfg.get("ep_size", 1))
    val_shard = (rank, world) if ep_size == 1 else (0, 1)
    val_ds = FlexiModalDataset(data_dir, "val", shard=val_shard)
    bs = per_rank_batch(int(tcfg["batch_size"]), world)
    sampler = ShardBatches(
        len(train_ds),
        bs,
        num_batches=ShardBatches.per_rank(train_ds.split_size, world, bs),
        seed=int(tcfg["seed"]),
        lengths=train_ds.num_rows() if tcfg.get("bucket_by_length", False) else None,
        rank=rank,
    )
    # Batches are gathered whole from the dataset's flat arrays (no per-stay arrays, no collate).
    train_loader = DataLoader(
        Batches(train_ds), sampler=sampler, batch_size=None, collate_fn=as_batch
    )
    # In order of length, which only cuts padding (a prediction does not depend on its batch).
    val_loader = DataLoader(
        Batches(val_ds),
        sampler=length_batches(val_ds.num_rows(), bs * 2),
        batch_size=None,
        collate_fn=as_batch,
    )

    model = build_model(cfg["model"], spec)
    if ep_size > 1:
        from fusemoe.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ep_size)
    ds_config = deepspeed_config(
        dcfg, micro_batch_size=bs, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"])
    )
    epochs = int(tcfg["epochs"])
    steps_per_epoch = math.ceil(len(train_loader) / ds_config["gradient_accumulation_steps"])

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # DeepSpeed steps it after every optimizer step and saves it in its checkpoints.
        return lr_scheduler(optimizer, tcfg, steps_per_epoch)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, float(tcfg["weight_decay"])),
        config=ds_config,
        lr_scheduler=scheduler,
    )
    # Several CPU ranks on one machine average their gradients over shared memory (plain data
    # parallelism only: ZeRO and expert shards reduce over their own groups).
    shm_reduce = world > 1 and shm_allreduce.ready() and plain_data_parallel(dcfg)
    if (world == 1 and int(dcfg.get("zero_stage", 0)) == 0) or shm_reduce:
        # One rank has nothing to reduce, but DeepSpeed would still flatten every gradient into
        # buckets, all-reduce them over the one-rank group and copy them back, each step.
        engine.enable_backward_allreduce = False

    # Under expert parallelism each rank averages its own expert shards (the copy shares the
    # process groups), and validation runs the average's all-to-alls like the model's.
    ema = weight_average(engine.module, float(tcfg.get("ema_decay", 0.0)))
    scored = engine.module if ema is None else ema.module  # what validation and saving see
    start_epoch, history = 0, []
    if restore_dir is not None:
        engine.load_checkpoint(str(restore_dir), tag="ckpt")
        state = json.loads((Path(restore_dir) / STATE_FILE).read_text())
        if ema is not None:
            ema_file = Path(restore_dir) / EMA_FILE.format(rank=rank)
            ema.load_state_dict(torch.load(ema_file, map_location=device, weights_only=True))
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(f"[rank {rank}] resumed from {restore_dir} after epoch {state['epoch'] + 1}")
        if start_epoch >= epochs:
            # Every epoch was trained, but the last report may never have reached the caller
            # (e.g. a Tune search interrupted just then): report it again, nothing is retrained.
            report(history[-1], Path(restore_dir))

    clip = grad_clip(dcfg) if loop_clips(dcfg) else 0.0  # else DeepSpeed clips in engine.step
    modality_dropout = float(tcfg.get("modality_dropout", 0.0))
    if not 0.0 <= modality_dropout < 1.0:
        raise ValueError(
            f"train.modality_dropout={modality_dropout}: expected a probability in [0, 1)"
        )
    metrics: dict = history[-1] if history else {}
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        # Dropout RNG from (seed, epoch, rank), not from the process's past: a run resumed after
        # a failure trains exactly like an uninterrupted one, and the ranks draw their own masks
        # (the same stream on every rank would repeat one mask on each half of a global batch).
        set_seed(int(tcfg["seed"]) * 1000 + epoch + RANK_SEED_STRIDE * rank)
        engine.train()
        total, n_batches, n_samples, routing_acc = 0.0, 0, 0, {}
        for batch in train_loader:
            batch = drop_modalities(batch_to(batch, device), modality_dropout)
            out = engine(batch)
            loss = task_loss(out.logits, batch["labels"], spec.tasks, task_weights) + out.aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}")
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                if shm_reduce:
                    shm_allreduce.average_gradients(engine.module.parameters(), world)
                if clip:
                    torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip, foreach=True)
            steps = engine.global_steps
            engine.step()
            if ema is not None and engine.global_steps > steps:  # an optimizer step was taken
                ema.update_parameters(engine.module)
            total += float(loss.detach())
            n_batches += 1
            n_samples += len(batch["stay_id"])
            for k, v in out.routing.items():
                if v.numel() == 1:
                    routing_acc[k] = routing_acc.get(k, 0.0) + float(v)
        train_s = time.perf_counter() - t0
        pred = predict(scored, val_loader, device)
        if val_shard[1] > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, pred)
            pred = merge_predictions(parts)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": total / max(n_batches, 1),
            "samples_per_s": n_samples * world / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - t0,
            "lr": float(engine.get_lr()[0]),
            **{f"routing_{k}": v / max(n_batches, 1) for k, v in routing_acc.items()},
            **task_metrics(pred, spec, "val"),
        }
        history.append(metrics)
        eta = (epochs - epoch - 1) * metrics["epoch_s"]
        if rank == 0:
            primary = tcfg.get("primary_metric", "")
            log(
                f"epoch {epoch + 1}/{epochs} loss {metrics['train_loss']:.4f} "
                f"{primary} {metrics.get(primary, math.nan):.4f} "
                f"samples/s {metrics['samples_per_s']:.0f} ETA {eta:.0f}s",
            )
        with tempfile.TemporaryDirectory(prefix="fusemoe-ckpt-") as tmp:
            ckpt = Path(tmp)
            engine.save_checkpoint(str(ckpt), tag="ckpt")  # expert shards: one file per expert
            if ema is not None:
                torch.save(ema.state_dict(), ckpt / EMA_FILE.format(rank=rank))
            full_state = _full_state_dict(scored, ep_size)  # a collective under EP
            if rank == 0:
                (ckpt / STATE_FILE).write_text(json.dumps({"epoch": epoch, "history": history}))
                save_model(full_state, cfg["model"], spec, ckpt / "model")
            report(metrics, ckpt)
    return {"metrics": metrics, "history": history}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups; expert parameters get their own groups so DeepSpeed reduces them per EP group."""
    groups = [{"params": list(model.parameters()), "weight_decay": weight_decay, "name": "all"}]
    try:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    except ImportError:
        return groups
    return split_params_into_different_moe_groups_for_optimizer(groups)


def _full_state_dict(model: torch.nn.Module, ep_size: int) -> dict:
    """With expert parallelism each rank holds a slice of the experts; gather them for saving."""
    if ep_size <= 1:
        return model.state_dict()
    from fusemoe.parallel.expert_parallel import consolidated_state_dict

    return consolidated_state_dict(model)
