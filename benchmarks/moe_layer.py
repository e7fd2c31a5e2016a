"""MoE layer benchmark: forward+backward per step for the reference loop, DeepSpeed and ours.

Implementations (all include the gate, fp32, and the backward to inputs, gate and experts):
  loop_reference      per-expert Python loop with a mask per expert, like the reference FuseMoE code (a)
  deepspeed_topkgate  deepspeed.moe.layer.MoE with its own TopKGate (softmax only; its default
                      capacity_factor=1.0, i.e. it drops overflow tokens) (b)
  deepspeed_ourgate   deepspeed.moe.layer.MoE routed by our gate, dropless (capacity = max load) (b')
  ours_grouped        fusemoe Experts, sorted dispatch + one grouped GEMM (c)
  ours_loop           fusemoe Experts, sorted dispatch + per-expert GEMMs over static slices (c')

MFU = model FLOPs / time / ceiling, where the ceiling is a large dense matmul in the experts' dtype
measured in the same run; model FLOPs = 3 x forward (expert FFNs 4*N*K*d*h + gate 2*N*d*E).
Ratios vs (a) and (b) use the same gate and come from the same run. Steps are timed in
interleaved rounds (every implementation once per round) and summarised by the median, so a
noisy shared machine biases no implementation in particular.

    python benchmarks/moe_layer.py --device cpu --sizes fusemoe
    python benchmarks/moe_layer.py --device cuda --sizes fusemoe mid large
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusemoe.nn.experts import Experts, reference_moe  # noqa: E402
from fusemoe.nn.gates import make_gate  # noqa: E402

SIZES = {  # tokens, d_model, hidden, experts, top-k
    "fusemoe": (6144, 128, 512, 16, 4),
    "mid": (24576, 256, 1024, 16, 4),
    "large": (16384, 1024, 4096, 8, 2),
}
IMPLS = ("loop_reference", "deepspeed_topkgate", "deepspeed_ourgate", "ours_grouped", "ours_loop")


class Timer:
    """Wall time on CPU; CUDA events on GPU (no host sync inside the timed region)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def matmul_step(device: torch.device, dtype: torch.dtype, n: int) -> tuple[Callable[[], None], int]:
    """A dense n x n x n matmul and its FLOPs: the MFU ceiling, timed in the same rounds as the
    MoE steps so that load from other processes affects both alike."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def build(impl: str, size: tuple, gate_kind: str, device, dtype, deepspeed_ok: bool):
    """Return a fwd+bwd step closure for one implementation, or None if it does not apply."""
    n, d, h, e, k = size
    torch.manual_seed(0)
    gate = make_gate(gate_kind, d, e, k).to(device)  # parameters and logits stay fp32
    experts = Experts(e, d, h).to(device, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    params = (experts.w1, experts.b1, experts.w2, experts.b2)

    if impl == "loop_reference":

        def fwd():
            r = gate(x)
            return reference_moe(x, r.topk_idx, r.topk_weights, *params)

    elif impl in ("ours_grouped", "ours_loop"):
        experts.backend = impl.removeprefix("ours_")

        def fwd():
            r = gate(x)
            return experts(x, r.topk_idx, r.topk_weights)

    else:
        if not deepspeed_ok or (impl == "deepspeed_topkgate" and gate_kind != "softmax"):
            return None
        from fusemoe.parallel.deepspeed_moe import DeepSpeedMoELayer

        ours = impl == "deepspeed_ourgate"
        layer = DeepSpeedMoELayer(d, h, e, k, gate=gate if ours else None).to(device)
        layer.moe.deepspeed_moe.experts.to(dtype)
        if ours:
            layer.load_experts(experts)

        def fwd():
            return layer(x)[0]

    grad = torch.randn(n, d, device=device, dtype=dtype)

    def step():
        x.grad = None
        fwd().backward(grad)

    return step, fwd


def compile_checks(device: torch.device) -> dict:
    """Does our forward trace as one graph (no host sync)? On CUDA: inductor and a CUDA graph.

    The grouped GEMM's meta kernel accepts bf16 only, so the check runs the bf16 experts.
    """
    n, d, h, e, k = 512, 128, 256, 8, 2
    experts = Experts(e, d, h, backend="grouped").to(device, torch.bfloat16)
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    w, idx = torch.randn(n, e, device=device).softmax(-1).topk(k)
    want = experts(x, idx, w)
    out = {}
    backends = ["eager"] + (["inductor"] if device.type == "cuda" else [])
    for backend in backends:
        torch._dynamo.reset()
        try:
            got = torch.compile(experts, backend=backend, fullgraph=True)(x, idx, w)
            ok = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            out[f"torch_compile_fullgraph_{backend}"] = "ok" if ok else "mismatch"
        except Exception as exc:  # report, do not hide: this is what the check is for
            out[f"torch_compile_fullgraph_{backend}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    if device.type == "cuda":
        try:
            with torch.no_grad():
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        experts(x, idx, w)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = experts(x, idx, w)
                graph.replay()
                torch.cuda.synchronize()
            ok = torch.allclose(static.float(), want.float(), rtol=2e-2, atol=2e-2)
            out["cuda_graph_capture"] = "ok" if ok else "mismatch"
        except Exception as exc:
            out["cuda_graph_capture"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return out


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["fusemoe"])
    ap.add_argument("--gates", nargs="+", default=["softmax", "laplace"])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 7 cpu, 50 cuda)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds (default 2 cpu, 10 cuda)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (CPU; on a shared machine 1 thread is far less noisy)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds = args.rounds or (50 if device.type == "cuda" else 7)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    timer = Timer(device)
    try:
        import deepspeed

        deepspeed_ok, ds_version = True, deepspeed.__version__
    except ImportError:
        deepspeed_ok, ds_version = False, None

    matmul, matmul_flops = matmul_step(device, dtype, 8192 if device.type == "cuda" else 1024)
    ceilings = []
    results = []
    for size_name in args.sizes:
        size = SIZES[size_name]
        n, d, h, e, k = size
        flops = 3 * (4 * n * k * d * h + 2 * n * d * e)
        for gate_kind in args.gates:
            steps, fwds = {}, {}
            for impl in args.impls:
                built = build(impl, size, gate_kind, device, dtype, deepspeed_ok)
                if built is not None:
                    steps[impl], fwds[impl] = built
            # Same gate, same expert weights: the dropless implementations must agree.
            with torch.no_grad():
                ref = fwds["loop_reference"]().float() if "loop_reference" in fwds else None
                for impl in ("ours_grouped", "ours_loop", "deepspeed_ourgate"):
                    if ref is not None and impl in fwds:
                        tol = 1e-3 if dtype == torch.float32 else 5e-2
                        torch.testing.assert_close(fwds[impl]().float(), ref, rtol=tol, atol=tol)
            steps["matmul_ceiling"] = matmul
            times: dict[str, list[float]] = {impl: [] for impl in steps}
            for r in range(warmup + rounds):
                for impl, step in steps.items():
                    ms = timer(step)
                    if r >= warmup:
                        times[impl].append(ms)
            ceiling = matmul_flops / (statistics.median(times.pop("matmul_ceiling")) / 1e3)
            ceilings.append(
                {"size": size_name, "gate": gate_kind, "tflops": round(ceiling / 1e12, 4)}
            )
            print(f"matmul ceiling ({dtype}): {ceiling / 1e12:.4f} TFLOP/s", flush=True)
            for impl, ts in times.items():
                ms = statistics.median(ts)
                row = {
                    "size": size_name,
                    "tokens": n,
                    "d_model": d,
                    "hidden": h,
                    "experts": e,
                    "top_k": k,
                    "gate": gate_kind,
                    "impl": impl,
                    "ms_median": round(ms, 4),
                    "ms_min": round(min(ts), 4),
                    "ms_all": [round(t, 4) for t in ts],
                    "tokens_per_s": round(n / (ms / 1e3), 1),
                    "tflops": round(flops / (ms / 1e3) / 1e12, 4),
                    "mfu": round(flops / (ms / 1e3) / ceiling, 4),
                }
                results.append(row)
                print(
                    f"{size_name:8s} {gate_kind:8s} {impl:20s} {ms:9.3f} ms  "
                    f"{row['tokens_per_s']:12.0f} tok/s  MFU {row['mfu']:.3f}",
                    flush=True,
                )
    by_key = {(r["size"], r["gate"], r["impl"]): r for r in results}
    for r in results:
        a = by_key.get((r["size"], r["gate"], "loop_reference"))
        b = by_key.get((r["size"], r["gate"], "deepspeed_ourgate"))
        b_own = by_key.get((r["size"], "softmax", "deepspeed_topkgate"))
        soft = by_key.get((r["size"], "softmax", r["impl"]))
        r["speedup_vs_loop_reference"] = a and round(a["ms_median"] / r["ms_median"], 3)
        r["speedup_vs_deepspeed_ourgate"] = b and round(b["ms_median"] / r["ms_median"], 3)
        r["speedup_vs_deepspeed_topkgate"] = b_own and round(b_own["ms_median"] / r["ms_median"], 3)
        r["cost_vs_softmax_gate"] = soft and round(r["ms_median"] / soft["ms_median"], 3)

    report = {
        "benchmark": "moe_layer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "dtype_experts": str(dtype).removeprefix("torch."),
        "dtype_gate": "float32",
        "machine": machine(device),
        "versions": {"torch": torch.__version__, "deepspeed": ds_version},
        "rounds": rounds,
        "warmup": warmup,
        "matmul_ceiling": f"{'8192' if device.type == 'cuda' else '1024'}^3 matmul in the experts' dtype, median over the same rounds",
        "matmul_ceiling_tflops": ceilings,
        "flops_per_step": "3 * (4*N*K*d*h + 2*N*d*E)",
        "compile_checks": compile_checks(device),
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"moe_layer_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["compile_checks"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
