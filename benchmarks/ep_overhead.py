"""Expert-parallel overhead on CPU gloo: EP=2 over 2 processes vs EP=1 (data parallel) per step.

Both run the same global batch split over the 2 ranks, with the same gate and experts. EP=1 keeps
all experts on each rank (no communication inside the layer); EP=2 holds half the experts per rank
and moves tokens with two all-to-alls (plus one counts exchange) each way. Time = forward+backward
of gate + experts, the slower rank's time per step, median over interleaved rounds.

    python benchmarks/ep_overhead.py            # FuseMoE size: 6,144 tokens, d 128, h 512, E 16, k 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402

from fusemoe.nn.experts import Experts  # noqa: E402
from fusemoe.nn.gates import make_gate  # noqa: E402
from fusemoe.parallel.expert_parallel import apply_expert_parallel  # noqa: E402

WORLD = 2


def _rank(args: argparse.Namespace, port: int, queue, rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    n = args.tokens // WORLD
    torch.manual_seed(0)
    gate = make_gate(args.gate, args.d, args.experts, args.k)
    models = {"ep1": Experts(args.experts, args.d, args.hidden)}
    torch.manual_seed(0)
    models["ep2"] = apply_expert_parallel(
        torch.nn.ModuleDict({"e": Experts(args.experts, args.d, args.hidden)}), WORLD
    )["e"]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n, args.d, generator=g, requires_grad=True)
    grad = torch.randn(n, args.d, generator=g)

    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.warmup + args.rounds):
        for name, experts in models.items():
            dist.barrier()
            t = time.perf_counter()
            route = gate(x)
            experts(x, route.topk_idx, route.topk_weights).backward(grad)
            ms = torch.tensor((time.perf_counter() - t) * 1e3)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            if r >= args.warmup:
                times[name].append(ms.item())
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=6144, help="global tokens per step")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--gate", default="laplace")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "ep_overhead_cpu.json")
    )
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # ranks inherit the imported torch/deepspeed
    queue = ctx.SimpleQueue()
    mp.start_processes(
        partial(_rank, args, port, queue), nprocs=WORLD, join=True, start_method="fork"
    )
    times = queue.get()
    ep1, ep2 = statistics.median(times["ep1"]), statistics.median(times["ep2"])
    n_local = args.tokens // WORLD
    bytes_per_direction = n_local * args.k * args.d * 4 // WORLD  # half the rows leave the rank
    report = {
        "benchmark": "ep_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "backend": "gloo (CPU)",
        "world_size": WORLD,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads_per_rank": args.threads,
        },
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "config": vars(args) | {"tokens_per_rank": n_local},
        "ep1_ms_median": round(ep1, 3),
        "ep2_ms_median": round(ep2, 3),
        "ep2_over_ep1": round(ep2 / ep1, 3),
        "ep2_overhead_ms": round(ep2 - ep1, 3),
        "approx_bytes_sent_per_rank_per_all_to_all": bytes_per_direction,
        "ep1_ms_all": [round(t, 3) for t in times["ep1"]],
        "ep2_ms_all": [round(t, 3) for t in times["ep2"]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_all")}, indent=1))


if __name__ == "__main__":
    main()
