"""Gate convergence: how fast do Laplace- and softmax-gated MoE fits approach a known truth?

The FuseMoE paper (Han et al. 2024, Sec. 4) argues that Laplace gating, logits ``-||x - w_e|| + b_e``,
gives faster parameter estimation than softmax gating, logits ``beta_e^T x + b_e``, because it
removes the interaction between gate and expert parameters that slows softmax MoE fits down.

Setup (all fp64, full batch, maximum likelihood with L-BFGS and several restarts):
  * ground truth: a Gaussian mixture of linear experts, y | x ~ sum_e g_e(x) N(a_e^T x + c_e, s_e^2),
    with Laplace gating (the brief's protocol) and, as a control, softmax gating;
  * fits: a Laplace-gated and a softmax-gated MoE with the same, over-specified number of experts
    (k0 + 1), for every sample size n of a log grid and several replicates;
  * errors: ``mean_mse`` = mean squared difference between fitted and true conditional mean
    E[y | x] on a large held-out sample of x (comparable across gates), and ``voronoi`` = the
    Voronoi parameter loss of a fit to a truth of its own gate family (the quantity the theory
    bounds; the paper's claim compares these two well-specified rates);
  * slope: least-squares slope of log(error) vs log(n), per replicate, reported as mean and std.

A fit whose gate family differs from the truth's is misspecified: its error stops decreasing at the
approximation error, so a flat slope there measures misspecification rather than sample efficiency.
The control truth (softmax) shows the same effect with the roles swapped.

Run: ``nice -n 10 timeout 900 .venv/bin/python benchmarks/gate_convergence.py`` (about 10 min, 1 core).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
# A compact parameter space, as the theory assumes: without it the likelihood is unbounded
# (sigma -> 0) and a Laplace centre can drift far away with a large bias.
SIGMA_MIN = 0.05  # lower bound on expert noise
W_MAX = 4.0  # gate parameters in [-W_MAX, W_MAX]^d; x is uniform on [-2, 2]^d, truths within 2


@dataclass
class MoEParams:
    """Parameters of a Gaussian MoE with linear experts; ``w`` is gate centres (Laplace) or slopes."""

    w: torch.Tensor  # [k, d]
    b: torch.Tensor  # [k]
    a: torch.Tensor  # [k, d]
    c: torch.Tensor  # [k]
    log_s: torch.Tensor  # [k]

    def tensors(self) -> list[torch.Tensor]:
        return [self.w, self.b, self.a, self.c, self.log_s]


def gate_logits(gate: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gate logits [n, k]; the Laplace distance is smoothed by 1e-12 so its gradient exists at x = w."""
    if gate == "laplace":
        dist = ((x[:, None, :] - w[None, :, :]) ** 2).sum(-1).add(1e-12).sqrt()
        return -dist + b
    if gate == "softmax":
        return x @ w.T + b
    raise ValueError(f"unknown gate {gate!r}")


def sigma(p: MoEParams) -> torch.Tensor:
    return SIGMA_MIN + torch.nn.functional.softplus(p.log_s)


def neg_log_lik(gate: str, p: MoEParams, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of y given x."""
    log_g = torch.log_softmax(gate_logits(gate, x, p.w, p.b), dim=-1)
    mu = x @ p.a.T + p.c
    s = sigma(p)
    log_n = -0.5 * ((y[:, None] - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return -torch.logsumexp(log_g + log_n, dim=-1).mean()


def cond_mean(gate: str, p: MoEParams, x: torch.Tensor) -> torch.Tensor:
    g = torch.softmax(gate_logits(gate, x, p.w, p.b), dim=-1)
    return (g * (x @ p.a.T + p.c)).sum(-1)


def truth(gate: str, d: int) -> MoEParams:
    """Three well-separated experts in d dimensions (d >= 2); softplus^-1 gives the stated noise."""
    w = torch.zeros(3, d, dtype=torch.float64)
    a = torch.zeros(3, d, dtype=torch.float64)
    if gate == "laplace":
        w[:, :2] = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 1.0]])
    else:
        w[:, :2] = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]])
    a[:, :2] = torch.tensor([[1.0, -1.0], [-1.0, 0.5], [0.5, 1.5]])
    s = torch.tensor([0.3, 0.4, 0.35], dtype=torch.float64) - SIGMA_MIN
    return MoEParams(
        w=w,
        b=torch.tensor([0.0, 0.3, -0.2], dtype=torch.float64),
        a=a,
        c=torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64),
        log_s=torch.log(torch.expm1(s)),
    )


def sample(
    gate: str, p: MoEParams, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    d = p.w.shape[1]
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * 4 - 2  # uniform on [-2, 2]^d
    g = torch.softmax(gate_logits(gate, x, p.w, p.b), dim=-1)
    e = torch.multinomial(g, 1, generator=gen).squeeze(1)
    mu = (x * p.a[e]).sum(-1) + p.c[e]
    y = mu + sigma(p)[e] * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def init_params(k: int, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> MoEParams:
    """Random start: gate centres at random data points (Laplace) / small random slopes (softmax)."""
    n, d = x.shape
    idx = torch.randperm(n, generator=gen)[:k]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return MoEParams(
        w=x[idx].clone(),
        b=0.1 * rnd(k),
        a=rnd(k, d),
        c=y[idx].clone(),
        log_s=torch.full((k,), math.log(math.expm1(float(y.std()))), dtype=torch.float64),
    )


def lbfgs(gate: str, p: MoEParams, x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    """Minimise the NLL in place from ``p``; returns the final NLL (inf if the run diverged).

    Gate parameters w are kept in the box [-W_MAX, W_MAX]^d (w = W_MAX tanh(raw)): the theory
    assumes a compact parameter space, and without it a Laplace expert can drift to a far centre
    with a large bias (nearly a softmax gate there), which the likelihood barely notices but which
    makes parameter errors meaningless.
    """
    raw_w = torch.atanh((p.w / W_MAX).clamp(-0.999, 0.999))
    params = [t.detach().clone().requires_grad_(True) for t in (raw_w, p.b, p.a, p.c, p.log_s)]
    current = lambda: MoEParams(W_MAX * torch.tanh(params[0]), *params[1:])  # noqa: E731
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = neg_log_lik(gate, current(), x, y)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:
        return float("inf")
    with torch.no_grad():
        fitted = current()
        for name in ("w", "b", "a", "c", "log_s"):
            setattr(p, name, getattr(fitted, name).detach().clone())
        return float(neg_log_lik(gate, p, x, y))


def fit(
    gate: str, k: int, x: torch.Tensor, y: torch.Tensor, restarts: int, iters: int, seed: int
) -> tuple[MoEParams, float]:
    """Best-of-``restarts`` maximum-likelihood fit (L-BFGS, strong Wolfe line search)."""
    gen = torch.Generator().manual_seed(seed)
    best, best_nll = None, float("inf")
    for _ in range(restarts):
        p = init_params(k, x, y, gen)
        if gate == "softmax":
            p.w = 0.5 * torch.randn(k, x.shape[1], generator=gen, dtype=torch.float64)
        nll = lbfgs(gate, p, x, y, iters)
        if math.isfinite(nll) and nll < best_nll:
            best_nll = nll
            best = p
    if best is None:
        raise RuntimeError(f"all {restarts} restarts of the {gate} fit failed")
    return best, best_nll


def voronoi_loss(gate: str, fitted: MoEParams, true: MoEParams) -> float:
    """Voronoi loss between a fitted and a true MoE of the same gate family (mixing measures).

    Each fitted atom joins the cell of the true atom nearest in expert parameters (a, c, sigma), which
    both gate families identify. Per true atom j:
    |sum_{i in V_j} pi_i - pi0_j| + sum_{i in V_j} pi_i * ||theta_i - theta0_j||^r, theta = (w, a, c,
    sigma), with r = 1 for a cell holding one fitted atom and r = 2 for an over-fitted cell (the
    exponents of the theory). Mixing weights pi = softmax(b) remove the invariance to a common shift
    of b; softmax gates are also invariant to a common shift of the slopes w, which is removed by
    the pi-weighted least-squares translation onto the true slopes of each atom's cell.
    """

    def experts(p: MoEParams) -> torch.Tensor:
        return torch.cat([p.a, p.c[:, None], sigma(p)[:, None]], dim=1)

    pi, pi0 = torch.softmax(fitted.b, 0), torch.softmax(true.b, 0)
    cell = torch.cdist(experts(fitted), experts(true)).argmin(dim=1)
    w = fitted.w
    if gate == "softmax":
        w = w + (pi[:, None] * (true.w[cell] - w)).sum(0) / pi.sum()
    th = torch.cat([w, experts(fitted)], dim=1)
    th0 = torch.cat([true.w, experts(true)], dim=1)
    loss = 0.0
    for j in range(th0.shape[0]):
        members = (cell == j).nonzero().flatten()
        loss += abs(float(pi[members].sum() - pi0[j]))
        r = 1 if len(members) == 1 else 2
        for i in members:
            loss += float(pi[i] * (th[i] - th0[j]).norm() ** r)
    return loss


def slope(ns: list[int], errs: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ns = np.unique(np.geomspace(args.n_min, args.n_max, args.num_n).round(-1).astype(int)).tolist()
    results: dict = {}
    t0 = time.time()
    for truth_gate in args.truths:
        p0 = truth(truth_gate, args.d)
        k = p0.w.shape[0] + args.extra_experts
        x_eval, _ = sample(truth_gate, p0, args.n_eval, torch.Generator().manual_seed(10_000))
        m_true = cond_mean(truth_gate, p0, x_eval)
        per = {g: {"mean_mse": [], "voronoi": [], "nll_gap": []} for g in args.fits}
        for rep in range(args.replicates):
            rows = {g: {"mean_mse": [], "voronoi": [], "nll_gap": []} for g in args.fits}
            for n in ns:
                gen = torch.Generator().manual_seed(1000 * rep + n)
                x, y = sample(truth_gate, p0, n, gen)
                true_nll = float(neg_log_lik(truth_gate, p0, x, y))
                for g in args.fits:
                    p, nll = fit(g, k, x, y, args.restarts, args.iters, seed=rep * 7919 + n)
                    mse = float(((cond_mean(g, p, x_eval) - m_true) ** 2).mean())
                    rows[g]["mean_mse"].append(mse)
                    rows[g]["nll_gap"].append(true_nll - nll)
                    matched = g == truth_gate  # parameters are comparable only within a family
                    rows[g]["voronoi"].append(voronoi_loss(g, p, p0) if matched else None)
                    print(
                        f"[{time.time() - t0:6.0f}s] truth={truth_gate} fit={g} rep={rep} n={n}"
                        f" mean_mse={mse:.2e} nll_gap={true_nll - nll:+.4f}",
                        flush=True,
                    )
            for g in args.fits:
                for key, vals in rows[g].items():
                    per[g][key].append(vals)
        block = {"n": ns, "num_experts_true": p0.w.shape[0], "num_experts_fit": k, "fits": {}}
        for g in args.fits:
            out = {}
            for key in ("mean_mse", "voronoi"):
                vals = per[g][key]
                if vals[0][0] is None:
                    continue
                arr = np.array(vals, dtype=float)  # [replicates, len(ns)]
                slopes = [slope(ns, r.tolist()) for r in arr]
                out[key] = {
                    "per_replicate": arr.tolist(),
                    "geo_mean": np.exp(np.log(arr).mean(0)).tolist(),
                    "slope_mean": float(np.mean(slopes)),
                    "slope_std": float(np.std(slopes, ddof=1)) if len(slopes) > 1 else 0.0,
                    "slope_per_replicate": slopes,
                    "slope_of_geo_mean": slope(ns, np.exp(np.log(arr).mean(0)).tolist()),
                }
            out["train_nll_gap"] = per[g]["nll_gap"]  # true NLL - fitted NLL (>0: fit beats truth)
            block["fits"][g] = out
        results[f"truth_{truth_gate}"] = block
    return {"results": results, "runtime_s": round(time.time() - t0, 1)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["results"]
    colour = {"laplace": "tab:blue", "softmax": "tab:orange"}
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4.2), squeeze=False)
    for ax, (name, block) in zip(axes[0], blocks.items(), strict=True):
        ns = np.array(block["n"])
        for g, out in block["fits"].items():
            for key, style in (("mean_mse", "-o"), ("voronoi", "--s")):
                if key not in out:
                    continue
                arr = np.log(np.array(out[key]["per_replicate"]))
                s = out[key]
                label = f"{g} fit, {key} (slope {s['slope_mean']:.2f}±{s['slope_std']:.2f})"
                ax.loglog(ns, np.exp(arr.mean(0)), style, color=colour.get(g), label=label)
                ax.fill_between(
                    ns, np.exp(arr.min(0)), np.exp(arr.max(0)), color=colour.get(g), alpha=0.15
                )
        for power, style in ((1.0, ":"), (0.5, "-.")):
            ax.loglog(
                ns, (ns[0] / ns) ** power * 1e-2, style, color="grey", label=f"slope -{power:g}"
            )
        ax.set_title(
            f"ground truth: {name.removeprefix('truth_')} gate, {block['num_experts_fit']} fitted experts"
        )
        ax.set_xlabel("sample size n")
        ax.set_ylabel("error (geo. mean; band = min..max)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2, help="input dimension (>= 2)")
    ap.add_argument(
        "--extra-experts", type=int, default=1, help="fitted experts beyond the truth's"
    )
    ap.add_argument("--n-min", type=int, default=300)
    ap.add_argument("--n-max", type=int, default=30000)
    ap.add_argument("--num-n", type=int, default=6)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per restart")
    ap.add_argument("--n-eval", type=int, default=50000, help="held-out x for the mean discrepancy")
    ap.add_argument("--truths", nargs="+", default=["laplace", "softmax"])
    ap.add_argument("--fits", nargs="+", default=["laplace", "softmax"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "gate_convergence.json")
    args = ap.parse_args(argv)

    report = run(args)
    report = {
        "benchmark": "gate_convergence",
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": args.threads,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sigma_min": SIGMA_MIN,
        "w_max": W_MAX,
        **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {report['runtime_s']} s")
    for name, block in report["results"].items():
        for g, out in block["fits"].items():
            for key in ("mean_mse", "voronoi"):
                if key in out:
                    s = out[key]
                    print(
                        f"{name:14s} fit={g:8s} {key:9s} slope {s['slope_mean']:+.3f} ± {s['slope_std']:.3f}"
                    )


if __name__ == "__main__":
    main()
