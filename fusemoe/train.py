"""One training loop for FuseMoE: CPU or GPU, a single process or one rank of many.

The loop drives a DeepSpeed engine (ZeRO 0-2, optional expert parallelism) and knows nothing about
Ray or MLflow: the caller passes `report(metrics, checkpoint_dir)` and, when resuming, the directory
of the last checkpoint. Every rank saves its part of the DeepSpeed checkpoint into its own directory
before calling `report`, so an orchestrator can merge and persist them (Ray Train does).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fusemoe.data.dataset import (
    DataSpec,
    FlexiModalDataset,
    ShardBatches,
    batch_to,
    collate,
    dataset_spec,
    drop_modalities,
)
from fusemoe.data.flexi import load_manifest
from fusemoe.metrics import KIND_METRICS, task_kind_metrics
from fusemoe.nn.losses import task_loss
from fusemoe.nn.model import FuseMoE, FuseMoEConfig

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"
STATE_FILE = "train_state.json"

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


def build_model(model_params: dict, spec: DataSpec) -> FuseMoE:
    return FuseMoE(FuseMoEConfig.from_params(model_params), spec)


def select_tasks(spec: DataSpec, names: list[str]) -> DataSpec:
    """Restrict a dataset's tasks to those being trained, with a clear error for unknown names."""
    known = {t.name: t for t in spec.tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"params.yaml train.tasks: unknown task(s) {unknown}; dataset has {sorted(known)}"
        )
    return DataSpec(series=spec.series, static_dim=spec.static_dim, tasks=[known[n] for n in names])


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    transform: Callable[[dict], dict] | None = None,
) -> dict:
    """Scores every sample of `loader`; returns stay ids, per-task outputs, labels and which
    modalities each sample had, as numpy. `transform` may edit a batch first (e.g. drop modalities).
    """
    model.eval()
    outs: dict[str, list] = {}
    labels: dict[str, list] = {}
    present: dict[str, list] = {}
    stay_ids: list[str] = []
    usage, n_seen = None, 0
    for batch in loader:
        batch = batch_to(batch, device)
        if transform is not None:
            batch = transform(batch)
        out = model(batch)
        if "expert_usage" in out.routing:  # [modalities, experts], averaged over samples
            b = len(batch["stay_id"])
            u = out.routing["expert_usage"].float().cpu() * b
            usage = u if usage is None else usage + u
            n_seen += b
        for m, flags in batch["present"].items():
            present.setdefault(m, []).append(flags.cpu())
        for task, logits in out.logits.items():
            outs.setdefault(task, []).append(logits.float().cpu())
            labels.setdefault(task, []).append(batch["labels"][task].float().cpu())
        stay_ids.extend(batch["stay_id"])
    return {
        "stay_id": stay_ids,
        "logits": {t: torch.cat(v).numpy() for t, v in outs.items()},
        "labels": {t: torch.cat(v).numpy() for t, v in labels.items()},
        "present": {m: torch.cat(v).numpy().astype(bool) for m, v in present.items()},
        "expert_usage": None if usage is None else (usage / n_seen).numpy(),
    }


def output_to_prediction(kind: str, logits: np.ndarray) -> np.ndarray:
    """Turns raw head outputs into what users consume: probabilities or regression values."""
    if kind in ("binary", "multilabel"):
        p = 1.0 / (1.0 + np.exp(-logits))
        return p[:, 0] if kind == "binary" and p.ndim == 2 else p
    if kind == "multiclass":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return logits[:, 0] if logits.ndim == 2 else logits


class NonFinitePrediction(ValueError):
    """A model output that is NaN or infinite (e.g. from an extreme input value): never written."""


def predictions_table(pred: dict, spec: DataSpec):
    """One row per stay: prob_<task> (binary), <task> (regression), prob_<task>_<k> per class and
    pred_<task> (multiclass: the most probable class), prob_<task>_<k> per label (multilabel).

    Every output must be finite, so no prediction file or pyfunc answer ever holds a NaN: a
    non-finite one raises NonFinitePrediction naming the stay."""
    import pandas as pd

    columns: dict[str, np.ndarray] = {"stay_id": np.asarray(pred["stay_id"], dtype=object)}
    for task in spec.tasks:
        out = output_to_prediction(task.kind, pred["logits"][task.name])
        if task.kind == "binary":
            columns[f"prob_{task.name}"] = out.reshape(-1)
        elif task.kind == "regression":
            columns[task.name] = out.reshape(-1)
        else:
            out = out.reshape(len(columns["stay_id"]), -1)
            columns.update({f"prob_{task.name}_{k}": out[:, k] for k in range(out.shape[1])})
            if task.kind == "multiclass":
                columns[f"pred_{task.name}"] = out.argmax(1).astype(np.int16)
    for name, values in columns.items():
        bad = ~np.isfinite(values) if name != "stay_id" else np.zeros(len(values), bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NonFinitePrediction(
                f"stay '{columns['stay_id'][i]}': prediction {name} is {values[i]} "
                f"({int(bad.sum())} stay(s) affected); check its input values for extremes"
            )
    return pd.DataFrame(columns)


def task_metrics(pred: dict, spec: DataSpec, prefix: str) -> dict[str, float]:
    """Flat metric dict (e.g. val_auroc_ihm, val_macro_auroc_activity) for every task."""
    metrics: dict[str, float] = {}
    for task in spec.tasks:
        yhat = output_to_prediction(task.kind, pred["logits"][task.name])
        m = task_kind_metrics(task.kind, pred["labels"][task.name], yhat)
        keys = KIND_METRICS[task.kind][1]
        metrics.update({f"{prefix}_{k}_{task.name}": m[k] for k in keys})
    return metrics


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _init_distributed(backend: str) -> None:
    """DeepSpeed needs a process group; a lone process gets a one-rank group on 127.0.0.1."""
    import deepspeed

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
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def save_model(state: dict, model_params: dict, spec: DataSpec, out_dir: Path) -> None:
    """A self-contained copy of the weights and the config needed to rebuild the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / MODEL_FILE)
    (out_dir / MODEL_CONFIG_FILE).write_text(
        json.dumps({"model": model_params, "spec": asdict(spec)}, indent=2)
    )


def load_model(model_dir: Path) -> tuple[FuseMoE, DataSpec]:
    """Rebuilds a model saved by `save_model` (weights only, never pickled code)."""
    from fusemoe.data.dataset import TaskSpec

    cfg = json.loads((Path(model_dir) / MODEL_CONFIG_FILE).read_text())
    s = cfg["spec"]
    spec = DataSpec(
        series=s["series"], static_dim=s["static_dim"], tasks=[TaskSpec(**t) for t in s["tasks"]]
    )
    model = build_model(cfg["model"], spec)
    state = torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, spec


def train(cfg: dict, report: Report, restore_dir: Path | None = None, log=print) -> dict:
    """Trains for `cfg["train"]["epochs"]` epochs, resuming from `restore_dir` when given.

    cfg holds `data_dir` and the params.yaml sections `model`, `train`, `deepspeed`.
    Returns {"metrics": last epoch's metrics, "history": every epoch's metrics}.
    """
    import deepspeed

    from fusemoe.parallel.engine import deepspeed_config

    tcfg, dcfg = cfg["train"], cfg["deepspeed"]
    use_cuda = torch.cuda.is_available() and cfg.get("use_gpu", False)
    _init_distributed("nccl" if use_cuda else "gloo")
    rank, world = _rank(), _world()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    set_seed(int(tcfg["seed"]))

    data_dir = str(cfg["data_dir"])  # a local path or a pyarrow URI (s3://...)
    spec = select_tasks(dataset_spec(load_manifest(data_dir)), list(tcfg["tasks"]))
    # Each rank reads only its shard of the training stays.
    train_ds = FlexiModalDataset(
        data_dir,
        "train",
        max_stays=int(tcfg.get("max_train_stays", 0)),
        shard=(rank, world),
    )
    val_ds = FlexiModalDataset(data_dir, "val")
    bs = int(tcfg["batch_size"])
    sampler = ShardBatches(
        len(train_ds),
        bs,
        num_batches=ShardBatches.per_rank(train_ds.split_size, world, bs),
        seed=int(tcfg["seed"]),
    )
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    # Every rank scores the whole validation set so expert-parallel all-to-alls stay in step.
    val_loader = DataLoader(val_ds, batch_size=bs * 2, shuffle=False, collate_fn=collate)

    model = build_model(cfg["model"], spec)
    ep_size = int(dcfg.get("ep_size", 1))
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

    start_epoch, history = 0, []
    if restore_dir is not None:
        engine.load_checkpoint(str(restore_dir), tag="ckpt")
        state = json.loads((Path(restore_dir) / STATE_FILE).read_text())
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(f"[rank {rank}] resumed from {restore_dir} after epoch {state['epoch'] + 1}")
        if start_epoch >= epochs:
            # Every epoch was trained, but the last report may never have reached the caller
            # (e.g. a Tune search interrupted just then): report it again, nothing is retrained.
            report(history[-1], Path(restore_dir))

    modality_dropout = float(tcfg.get("modality_dropout", 0.0))
    if not 0.0 <= modality_dropout < 1.0:
        raise ValueError(
            f"train.modality_dropout={modality_dropout}: expected a probability in [0, 1)"
        )
    metrics: dict = history[-1] if history else {}
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        # Dropout RNG from (seed, epoch), not from the process's past: a run resumed after a
        # failure trains exactly like an uninterrupted one.
        set_seed(int(tcfg["seed"]) * 1000 + epoch)
        engine.train()
        total, n_batches, n_samples, routing_acc = 0.0, 0, 0, {}
        for batch in train_loader:
            batch = drop_modalities(batch_to(batch, device), modality_dropout)
            out = engine(batch)
            loss = task_loss(out.logits, batch["labels"], spec.tasks) + out.aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}")
            engine.backward(loss)
            engine.step()
            total += float(loss.detach())
            n_batches += 1
            n_samples += len(batch["stay_id"])
            for k, v in out.routing.items():
                if v.numel() == 1:
                    routing_acc[k] = routing_acc.get(k, 0.0) + float(v)
        train_s = time.perf_counter() - t0
        pred = predict(engine.module, val_loader, device)
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
            full_state = _full_state_dict(engine.module, ep_size)  # a collective under EP
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
