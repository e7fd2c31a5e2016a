"""Routing statistics of per-modality routers under the two load-balance targets (issue 14, 6b).

``model.balance_scope: router`` balances each modality's router over all experts, which fights
FuseMoE's entropy regularizer (it wants each modality on its own experts); ``expert_set`` balances
the tokens the shared expert set receives, pooled over the routers. The same small model (params.yaml
``model``, per_modality routers) is trained on the same P12 subset with each target, and the
routing of the validation stays is summarised: per-modality and pooled expert usage (and their
effective number of experts, exp(entropy)), both balance values relative to uniform (1 = uniform),
the entropy term against its floor -log M, and validation AUROC. Training goes through the shipped
loop (``fusemoe.loop.train``, via benchmarks/shipped_loop.py) for a fixed number of epochs; the
routing is that of the epoch best on validation AUROC (``train.primary_metric``).

Run (from the repo root, on a FlexiModal directory written by ``python -m pipelines.prepare``):
    nice -n 10 .venv/bin/python benchmarks/routing_balance.py --data data/processed
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shipped_loop import LOOP, train_keeping_best  # noqa: E402
from fusemoe.data.dataset import FlexiModalDataset, collate  # noqa: E402
from fusemoe.data.flexi import load_manifest  # noqa: E402
from fusemoe.metrics import binary_metrics  # noqa: E402
from fusemoe.nn.losses import entropy  # noqa: E402
from fusemoe.nn.moe import BALANCE_SCOPES, MoELayer  # noqa: E402
from fusemoe.nn.mtand import EXACT_MASS, MTANDEncoder  # noqa: E402
from pipelines.common import BEST_PARAMS, apply_best_params  # noqa: E402

TASK = "ihm"


def train(
    data: Path, model_params: dict, params: dict, seed: int, args
) -> tuple[torch.nn.Module, dict]:
    """Trains through the shipped loop (`fusemoe.loop.train`, see benchmarks/shipped_loop.py)
    with params.yaml's `train`/`deepspeed` sections; returns the model of the best validation
    epoch and, per epoch, the loop's means of the training batches' balance and entropy terms."""
    train_params = params["train"] | {
        "tasks": [TASK],
        "epochs": args.epochs,
        "max_train_stays": args.train_stays,
    }
    sections = {"model": model_params, "train": train_params, "deepspeed": params["deepspeed"]}
    trained = train_keeping_best(data, sections, seed, log=lambda *_: None)
    stats = {
        f"train_{k}_per_epoch": [round(h[f"routing_{k}"], 4) for h in trained.history]
        for k in ("load_balance", "entropy_reg")
    }
    return trained.model, {"epoch": trained.best["epoch"]} | stats


@torch.no_grad()
def routing_stats(model: torch.nn.Module, data: Path, args) -> dict:
    """Validation routing of the first MoE layer's per-modality routers, and AUROC."""
    from torch.utils.data import DataLoader

    moe = next(m for m in model.modules() if isinstance(m, MoELayer))
    names = model.series_names + ([model.static_name or "static"] if model.has_static else [])
    m_count, e = len(moe.gates), moe.num_experts
    counts, prob_sums, tokens = (
        torch.zeros(m_count, e),
        torch.zeros(m_count, e),
        torch.zeros(m_count),
    )

    def hook(i):
        def record(_module, _inputs, out):
            counts[i] += torch.bincount(out.topk_idx.reshape(-1), minlength=e).float()
            prob_sums[i] += out.probs.sum(0)
            tokens[i] += out.probs.shape[0]

        return record

    exact = torch.zeros(2)  # mTAND (value, variable) entries: recomputed exactly, observed

    def count_exact(module, inputs, _out):
        _, density = module.interpolate(*inputs)
        observed = (inputs[1].sum(1) > 0)[:, None, None, :].expand_as(density)
        exact[0] += (observed & (density < EXACT_MASS)).sum()
        exact[1] += observed.sum()

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(moe.gates)]
    handles += [
        m.register_forward_hook(count_exact) for m in model.modules() if isinstance(m, MTANDEncoder)
    ]
    ds = FlexiModalDataset(data, "val", tasks=[TASK], max_stays=args.val_stays)
    model.eval()
    y, p = [], []
    for batch in DataLoader(ds, batch_size=256, collate_fn=collate):
        y.append(batch["labels"][TASK].reshape(-1))
        p.append(torch.sigmoid(model(batch).logits[TASK].float()).reshape(-1))
    for h in handles:
        h.remove()

    usage = counts / counts.sum(1, keepdim=True)  # [M, E] share of modality m's assignments
    mean_p = prob_sums / tokens[:, None]  # [M, E] modality m's mean router distribution
    pooled_usage = counts.sum(0) / counts.sum()
    pooled_p = prob_sums.sum(0) / tokens.sum()
    per_router = (e * (usage * mean_p).sum(1)).mean()
    pooled = e * (pooled_usage * pooled_p).sum()
    ent = entropy(mean_p).mean() - entropy(mean_p.mean(0))

    def rounded(t: torch.Tensor) -> list:
        return [round(float(v), 4) for v in t.reshape(-1)]

    return {
        "val_auroc": round(binary_metrics(torch.cat(y).numpy(), torch.cat(p).numpy())["auroc"], 4),
        "modalities": names,
        "expert_usage": {n: rounded(u) for n, u in zip(names, usage, strict=True)},
        "effective_experts": {
            n: round(math.exp(float(entropy(u))), 2) for n, u in zip(names, usage, strict=True)
        },
        "pooled_usage": rounded(pooled_usage),
        "pooled_effective_experts": round(math.exp(float(entropy(pooled_usage))), 2),
        "balance_per_router_vs_uniform": round(float(per_router), 4),
        "balance_pooled_vs_uniform": round(float(pooled), 4),
        "entropy_reg": round(float(ent), 4),
        "entropy_reg_floor": round(-math.log(m_count), 4),
        "mtand_exact_path_share": float(exact[0] / exact[1]),
    }


def summarise(runs: list[dict]) -> dict:
    """Means over seeds of the headline figures."""
    keys = (
        "val_auroc",
        "balance_per_router_vs_uniform",
        "balance_pooled_vs_uniform",
        "entropy_reg",
        "pooled_effective_experts",
    )
    out = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in keys}
    per_modality = [np.mean(list(r["effective_experts"].values())) for r in runs]
    out["effective_experts_per_modality"] = round(float(np.mean(per_modality)), 2)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--train-stays", type=int, default=1500)
    ap.add_argument("--val-stays", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--best-params",
        action="store_true",
        help="lay best_params.yaml over params.yaml as the train stage does (the committed run)",
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_balance.json"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = yaml.safe_load(args.params.read_text())
    if args.best_params:
        params = apply_best_params(params, ROOT / BEST_PARAMS)
    manifest = load_manifest(args.data)
    model_params = {**params["model"], "router": "per_modality"}
    runs: dict[str, list[dict]] = {scope: [] for scope in BALANCE_SCOPES}
    for seed in args.seeds:
        for scope in BALANCE_SCOPES:
            t0 = time.perf_counter()
            scoped = {**model_params, "balance_scope": scope}
            model, train_stats = train(args.data, scoped, params, seed, args)
            run = {"seed": seed} | routing_stats(model, args.data, args) | train_stats
            run["seconds"] = round(time.perf_counter() - t0, 1)
            runs[scope].append(run)
            print(scope, json.dumps(run), flush=True)
    summary = {scope: summarise(rs) for scope, rs in runs.items()}
    result = {
        "benchmark": "routing_balance",
        "command": "python benchmarks/routing_balance.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {
            "dir": str(args.data),
            **{k: manifest[k] for k in ("source", "source_hashes", "split") if k in manifest},
            "train_stays": args.train_stays,
            "val_stays": args.val_stays,
        },
        "model": model_params,
        "train": {"epochs": args.epochs, "seeds": args.seeds, "threads": args.threads}
        | {k: params["train"][k] for k in ("batch_size", "lr", "lr_schedule", "weight_decay")},
        "deepspeed": params["deepspeed"],
        "training_loop": LOOP,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "summary_mean_over_seeds": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
