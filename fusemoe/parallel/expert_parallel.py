"""Expert parallelism: each rank of an expert-parallel (EP) group holds E/ep_size experts.

Model code stays single-device (it builds ``fusemoe.nn.experts.Experts``); ``apply_expert_parallel``
swaps every ``Experts`` for an ``ExpertParallelExperts`` holding only this rank's slice of the
experts, torchtitan-style. Process groups come from DeepSpeed's ``deepspeed.utils.groups`` (the same
``ep_size_<n>`` groups its own MoE layer uses), so the DeepSpeed engine finds them.

How the DeepSpeed engine (0.19.8) treats expert parameters, and what this module does about it:

- A parameter with ``allreduce = False`` is an expert parameter (``deepspeed.moe.utils.is_moe_param``);
  its gradient is all-reduced over the expert-data-parallel group named by ``param.group_name``
  only, and divided by the full data-parallel world size (the expert's local gradient already sums
  the contributions of every rank in its EP group, via the all-to-all backward).
- The engine only sets up that path when ``engine.has_moe_layers`` is true, which it decides by
  ``isinstance(module, deepspeed.moe.layer.MoE)``. Without it, ZeRO-0 fails with a KeyError on the
  group name and ZeRO-1/2 with a missing expert-data-parallel group. So ``ExpertParallelExperts``
  also subclasses ``MoE`` as a type tag (it never runs ``MoE.__init__``; it sets the attributes the
  engine reads: ``num_experts``, ``num_local_experts``, ``ep_size``, ``expert_group_name``). With it,
  the engine splits the optimizer's parameter groups into dense and ``moe`` groups and ZeRO-1/2
  partitions expert state over the expert-data-parallel group.
- A client optimizer must be built on ``split_params_into_different_moe_groups_for_optimizer``
  groups; letting the engine build the optimizer from the config (``fusemoe.parallel.engine``) does
  that automatically.
- ``engine.save_checkpoint`` writes one file per global expert, holding the keys under
  ``deepspeed_moe.experts.deepspeed_experts.<local id>.`` of each MoE module's state dict, and
  ``load_checkpoint`` reads one such file per local expert. So ``ExpertParallelExperts`` presents its
  stacked ``[local experts, ...]`` weights in its state dict as per-expert tensors under those
  names (``_save_to_state_dict`` / ``_load_from_state_dict``); its parameters stay stacked.
  ``consolidated_state_dict(model)`` gives the EP=1 state dict for exporting a model.
"""

from __future__ import annotations

import copy

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups
from torch import Tensor, nn

from fusemoe.nn.experts import Experts, sort_by_expert

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
# Where DeepSpeed's checkpointing looks for expert i's tensors inside a MoE module's state dict.
DEEPSPEED_EXPERTS_KEY = "deepspeed_moe.experts.deepspeed_experts"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the EP / expert-data-parallel groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def init_expert_parallel_groups(ep_size: int) -> str:
    """Create (once) the EP and expert-data-parallel groups through DeepSpeed; return their name.

    Ranks [0..ep_size) form the first EP group, and so on; rank r's expert-data-parallel group is
    every rank with the same position in its EP group. Needs torch.distributed initialised (or the
    usual RANK/WORLD_SIZE/MASTER_ADDR env, which ``deepspeed.init_distributed`` reads).
    """
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend=dist.get_backend() if dist.is_initialized() else None
        )
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return (
            _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group),
            None,
            None,
            None,
        )


class ExpertParallelExperts(Experts, _DeepSpeedMoE):
    """This rank's ``num_experts // ep_size`` experts; tokens reach them by all-to-all.

    Forward: sort local token-expert pairs by global expert (experts are laid out contiguously by
    rank, so the sorted rows are already grouped by destination), exchange per-expert counts,
    all-to-all the rows, regroup the received rows by local expert, run the grouped FFN, and send
    the results back the same way. The split sizes must be Python ints for
    ``all_to_all_single``, so EP reads the counts on the host once per layer call: a sync that is
    inherent to variable-size EP dispatch (the dense EP=1 path has none).
    """

    def __init__(self, experts: Experts, ep_size: int):
        nn.Module.__init__(self)  # MoE is only a type tag for the DeepSpeed engine; skip its init
        if experts.num_experts % ep_size:
            raise ValueError(
                f"num_experts={experts.num_experts} not divisible by ep_size={ep_size}"
            )
        self.expert_group_name = init_expert_parallel_groups(ep_size)
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)
        self.ep_size, self.ep_rank = ep_size, dist.get_rank(group=self.ep_group)
        self.num_experts, self.d_model, self.hidden = (
            experts.num_experts,
            experts.d_model,
            experts.hidden,
        )
        self.num_local_experts = experts.num_experts // ep_size
        self.backend = experts.backend
        lo = self.ep_rank * self.num_local_experts
        hi = lo + self.num_local_experts
        for name in EXPERT_PARAMS:
            full = getattr(experts, name)
            p = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
            p.allreduce = False  # expert param: reduce over the expert-data-parallel group only
            p.group_name = self.expert_group_name
            setattr(self, name, p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep_size={self.ep_size}, local_experts={self.num_local_experts}"

    def __deepcopy__(self, memo: dict) -> ExpertParallelExperts:
        """A copy of the weights that shares this rank's process group (a process group cannot be
        copied): what a weight average (``train.ema_decay``) of an expert-parallel model needs."""
        memo[id(self.ep_group)] = self.ep_group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return copied

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Local expert i's slice of each stacked weight, under DeepSpeed's per-expert key."""
        for name in EXPERT_PARAMS:
            t = getattr(self, name)
            t = t if keep_vars else t.detach()
            for i in range(self.num_local_experts):
                destination[f"{prefix}{DEEPSPEED_EXPERTS_KEY}.{i}.{name}"] = t[i]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """Stack DeepSpeed's per-expert tensors back into this module's weights."""
        for name in EXPERT_PARAMS:
            keys = [
                f"{prefix}{DEEPSPEED_EXPERTS_KEY}.{i}.{name}" for i in range(self.num_local_experts)
            ]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine on every module that has it; our groups already exist."""

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        p, el = self.ep_size, self.num_local_experts
        order, token, counts = sort_by_expert(expert_idx, self.num_experts)
        # recv[q * el + e]: rows rank q sends to my local expert e.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.ep_group)
        send_splits = counts.view(p, el).sum(1).tolist()  # host sync, inherent to EP
        recv_splits = recv.view(p, el).sum(1).tolist()
        rows = _AllToAll.apply(x[token].to(self.w1.dtype), recv_splits, send_splits, self.ep_group)
        # Received rows are grouped by source rank, then local expert: regroup by local expert.
        local_expert = torch.arange(el, device=x.device).repeat(p)
        row_expert = torch.repeat_interleave(local_expert, recv, output_size=rows.shape[0])
        perm = torch.argsort(row_expert, stable=True)
        y = self.ffn(rows[perm], recv.view(p, el).sum(0))
        y = torch.zeros_like(y).index_copy(0, perm, y)
        y = _AllToAll.apply(y, send_splits, recv_splits, self.ep_group)
        y = y.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, y).to(x.dtype)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Swap every ``Experts`` in ``model`` (in place) for its expert-parallel shard; return model.

    Rank r keeps experts [r * E/ep, (r+1) * E/ep) of its EP group, sliced from the full
    parameters, so a model built with the same seed starts identical to its EP=1 self.
    ``ep_size == 1`` leaves the model untouched (dense data parallelism; nothing to shard).
    Call before ``deepspeed.initialize``.
    """
    if ep_size == 1:
        return model
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is Experts
    ]
    for parent, name, child in swaps:
        setattr(parent, name, ExpertParallelExperts(child, ep_size))
    return model


def consolidated_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every expert shard all-gathered over its EP group.

    Collective: every rank must call it. The result has EP=1 shapes and loads into the model
    built without expert parallelism.
    """
    state = dict(model.state_dict())
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, ExpertParallelExperts):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for key in [k for k in state if k.startswith(f"{prefix}{DEEPSPEED_EXPERTS_KEY}.")]:
            del state[key]
        for name in EXPERT_PARAMS:
            shard = getattr(mod, name).detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(mod.ep_size)]
            dist.all_gather(parts, shard, group=mod.ep_group)
            state[prefix + name] = torch.cat(parts)
    return state
