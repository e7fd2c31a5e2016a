"""Expert parallelism on real processes (gloo, CPU): EP=2 over 2 ranks equals EP=1 on the same data.

Each rank holds half of the batch and half of the experts. The EP=1 reference runs inside every
rank on the whole batch, without communication, from the same seed.
"""

import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytest.importorskip("deepspeed")

# Imported once here; the forked ranks inherit them.
import deepspeed  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402

from fusemoe.loop import weight_average  # noqa: E402
from fusemoe.nn.experts import Experts  # noqa: E402
from fusemoe.nn.gates import make_gate  # noqa: E402
from fusemoe.parallel.engine import deepspeed_config  # noqa: E402
from fusemoe.parallel.expert_parallel import (  # noqa: E402
    apply_expert_parallel,
    consolidated_state_dict,
)

pytestmark = pytest.mark.slow

WORLD, D, H, E, K, N = 2, 16, 32, 8, 2, 24  # N tokens per rank


class TinyMoE(nn.Module):
    """Gate -> experts -> residual -> head: enough to have dense and expert params."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.gate = make_gate("laplace", D, E, K)
        self.experts = Experts(E, D, H, backend=backend)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        return self.head(x + self.experts(x, g.topk_idx, g.topk_weights)).squeeze(-1)


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(WORLD * N, D, generator=g), torch.randn(WORLD * N, generator=g)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, **kwargs) -> None:
    kwargs["_port"] = free_port()
    # fork: the children inherit the already-imported torch/deepspeed (importing deepspeed takes
    # ~20 s on the 2-core CI machine); they use one intra-op thread each.
    mp.start_processes(partial(_run_rank, fn, kwargs), nprocs=WORLD, join=True, start_method="fork")


def _run_rank(fn, kwargs, rank: int) -> None:
    # Only the children get rendezvous variables: the test process's environment stays clean
    # (Ray sessions started later in this process would inherit them).
    port = kwargs.pop("_port")
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, **kwargs)
    finally:
        dist.destroy_process_group()


def expert_slice(rank: int) -> slice:
    el = E // WORLD
    return slice(rank * el, (rank + 1) * el)


def _check_forward_backward(rank: int, backend: str) -> None:
    x, y = data()
    torch.manual_seed(0)
    ref = TinyMoE(backend)
    ref_out = ref(x)
    ref_loss = F.mse_loss(ref_out, y)
    ref_loss.backward()

    torch.manual_seed(0)
    model = apply_expert_parallel(TinyMoE(backend), ep_size=WORLD)
    assert model.experts.w1.shape[0] == E // WORLD and model.experts.w1.allreduce is False
    mine = slice(rank * N, (rank + 1) * N)
    out = model(x[mine])
    local_loss = F.mse_loss(out, y[mine])
    (local_loss / WORLD).backward()  # global loss = mean over ranks
    loss = local_loss.detach().clone()
    dist.all_reduce(loss)
    for p in model.parameters():
        if getattr(p, "allreduce", True):  # dense params: data-parallel all-reduce
            dist.all_reduce(p.grad)
        # expert params: expert-data-parallel group has size 1 here, nothing to reduce

    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out[mine], **tol)
    torch.testing.assert_close(loss / WORLD, ref_loss, **tol)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if name.startswith("experts."):
            want = want[expert_slice(rank)]
        torch.testing.assert_close(p.grad, want, **tol, msg=f"grad of {name}")
    full = consolidated_state_dict(model)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(full[name], t)


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_ep2_over_two_ranks_matches_ep1_outputs_loss_and_gradients(backend):
    launch(_check_forward_backward, backend=backend)


def _check_weight_average(rank: int) -> None:
    torch.manual_seed(0)
    model = apply_expert_parallel(TinyMoE(), ep_size=WORLD)
    ema = weight_average(model, 0.5)
    assert ema.module.experts.ep_group is model.experts.ep_group  # shared, not copied
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)  # 0.5 * w + 0.5 * (w + 1) for this rank's experts and the rest
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, start[name] + 0.5, msg=name)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5)
    x, _ = data()
    mine = slice(rank * N, (rank + 1) * N)
    # The average routes over the shared EP group like the model: same outputs at equal weights.
    torch.testing.assert_close(ema.module(x[mine]), model(x[mine]))


def test_a_weight_average_of_an_ep2_model_averages_each_ranks_experts_and_routes_alike():
    launch(_check_weight_average)


def _check_deepspeed_step(rank: int) -> None:
    x, y = data()
    mine = slice(rank * N, (rank + 1) * N)
    lr = 0.1

    # Reference: EP=1, whole batch, one process. SGD makes a wrong gradient scale visible
    # (Adam's first step is nearly scale-free).
    torch.manual_seed(0)
    ref = TinyMoE()
    F.mse_loss(ref(x), y).backward()
    torch.optim.SGD(ref.parameters(), lr=lr).step()

    torch.manual_seed(0)
    model = apply_expert_parallel(TinyMoE(), ep_size=WORLD)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}
    )
    config = deepspeed_config({"zero_stage": 1, "grad_clip": 0.0}, N, lr, 0.0)
    config.pop("optimizer")
    config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(groups, lr=lr), config=config
    )
    assert engine.has_moe_layers, "the engine must see the EP layer as MoE to reduce its grads"
    loss = F.mse_loss(engine(x[mine]), y[mine])
    engine.backward(loss)
    engine.step()

    assert_params_match(engine.module, ref, rank, rtol=1e-5, atol=1e-6)

    # The config path (AdamW built by the engine from deepspeed_config, ZeRO-2, clipping).
    torch.manual_seed(0)
    ref = TinyMoE()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-4)
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(
        model=apply_expert_parallel(TinyMoE(), ep_size=WORLD),
        model_parameters=None,
        config=deepspeed_config({"zero_stage": 2, "grad_clip": 0.05}, N, 1e-2, 1e-4),
    )
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        engine.backward(F.mse_loss(engine(x[mine]), y[mine]))
        engine.step()
    assert_params_match(engine.module, ref, rank, rtol=1e-4, atol=1e-5)


def assert_params_match(model, ref, rank: int, rtol: float, atol: float) -> None:
    """Every parameter equals the single-process reference's (experts: this rank's slice)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].detach()
        if name.startswith("experts."):
            want = want[expert_slice(rank)]
        torch.testing.assert_close(p.detach(), want, rtol=rtol, atol=atol, msg=f"param {name}")


def test_deepspeed_training_step_with_ep2_matches_ep1():
    launch(_check_deepspeed_step)


def _check_checkpoint_round_trip(rank: int, ckpt_dir: str, zero_stage: int) -> None:
    x, y = data()
    mine = slice(rank * N, (rank + 1) * N)
    config = deepspeed_config({"zero_stage": zero_stage}, N, 1e-2, 1e-4)

    def engine_and_step():
        torch.manual_seed(0)
        model = apply_expert_parallel(TinyMoE(), ep_size=WORLD)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=config)
        return engine, lambda: (
            engine.backward(F.mse_loss(engine(x[mine]), y[mine])),
            engine.step(),
        )

    engine, step = engine_and_step()
    step()
    engine.save_checkpoint(ckpt_dir, tag="ckpt")
    step()  # the uninterrupted second step
    dist.barrier()
    expert_files = sorted(p.name for p in Path(ckpt_dir, "ckpt").glob("layer_0_expert_*"))
    assert expert_files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(E)]

    resumed, resumed_step = engine_and_step()
    for p in resumed.module.parameters():  # so a load that skips a tensor cannot pass
        p.data.add_(1.0)
    resumed.load_checkpoint(ckpt_dir, tag="ckpt")
    resumed_step()
    want = dict(engine.module.named_parameters())
    for name, p in resumed.module.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=f"param {name}")


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_ep2_deepspeed_checkpoint_resumes_to_the_uninterrupted_weights(zero_stage, tmp_path):
    launch(_check_checkpoint_round_trip, ckpt_dir=str(tmp_path), zero_stage=zero_stage)
