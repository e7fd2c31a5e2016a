"""FuseMoE model properties (issue 5): batch invariance, determinism, missing modalities, gradients."""

import copy
import math

import pytest
import torch
from batches import STATIC, Spec, Task, collate, drop_modality, make_samples, random_batch

from fusemoe.nn.losses import task_loss
from fusemoe.nn.model import FuseMoE, FuseMoEConfig
from fusemoe.nn.moe import ROUTER_TYPES

# Tiny tensors: one intra-op thread avoids OpenMP spin contention on the shared 2-core machine.
torch.set_num_threads(1)

SMALL = dict(
    d_model=16,
    n_heads=2,
    n_layers=2,
    num_ref_points=4,
    num_experts=4,
    top_k=2,
    expert_hidden=24,
    dropout=0.0,
    load_balance_weight=0.01,
    entropy_weight=0.1,
)


# The property tests run on series + static and again with an embedding modality (issue 16).
SPECS = [Spec(), Spec(embeddings={"note": 6})]
SPEC_IDS = ["series", "with_embedding"]


def model(spec: Spec | None = None, seed: int = 0, **overrides) -> FuseMoE:
    torch.manual_seed(seed)
    return FuseMoE(FuseMoEConfig(**{**SMALL, **overrides}), spec or Spec())


def loss_of(m: FuseMoE, batch: dict, spec: Spec) -> torch.Tensor:
    out = m(batch)
    return task_loss(out.logits, batch["labels"], spec.tasks) + out.aux_loss


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("router", ROUTER_TYPES)
@pytest.mark.parametrize("count_features", [False, True])
def test_a_sample_scores_the_same_alone_and_in_any_batch(router, count_features, spec):
    m = model(spec, router=router, gate_noise=0.5, count_features=count_features).eval()
    samples = make_samples(spec, 6, seed=1)
    with torch.no_grad():
        together = m(collate(samples)).logits["ihm"]
        padded = m(collate(samples[::-1], extra_pad=7)).logits["ihm"].flip(0)
        pair = m(collate(samples[2:4], extra_pad=3)).logits["ihm"]
        for i, s in enumerate(samples):
            alone = m(collate([s])).logits["ihm"]
            torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair, together[2:4], atol=1e-5, rtol=0)


def test_same_seed_gives_the_same_loss_curve():
    spec = Spec()

    def curve() -> list[float]:
        m = model(seed=3, gate_noise=0.3, dropout=0.1)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        torch.manual_seed(3)
        losses = []
        for step in range(4):
            loss = loss_of(m, random_batch(spec, n=8, seed=step), spec)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    first, second = curve(), curve()
    assert first == second
    assert first[-1] != first[0]  # it actually trained


@pytest.mark.parametrize("modality", ["labs", STATIC, "note"])
def test_masking_a_modality_equals_dropping_its_events(modality):
    spec = SPECS[1]
    m = model(spec).eval()
    samples = make_samples(spec, 4, seed=2)
    masked = collate(samples)
    masked["present"][modality][1] = False
    if modality == STATIC:
        dropped_samples = list(samples)
        s = samples[1]["static"]
        dropped_samples[1] = {
            **samples[1],
            "static": {k: torch.zeros_like(v) for k, v in s.items()},
        }
    else:
        dropped_samples = [
            drop_modality(s, modality) if i == 1 else s for i, s in enumerate(samples)
        ]
    dropped = collate(dropped_samples)
    assert not dropped["present"][modality][1]
    with torch.no_grad():
        a, b = m(masked).logits["ihm"], m(dropped).logits["ihm"]
        full = m(collate(samples)).logits["ihm"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a[1] - full[1]).abs() > 1e-6  # the missing modality did change sample 1's prediction


@pytest.mark.parametrize(("modality", "position"), [("vitals", 0), ("note", 2)])
def test_missing_modality_uses_learned_embedding_not_zeros(modality, position):
    spec = SPECS[1]  # token layout: vitals, labs, note, static
    m = model(spec)
    batch = random_batch(spec, n=3)
    batch["present"][modality][:] = False
    t = SMALL["num_ref_points"]
    tokens = m.encode(batch)[:, position * t : (position + 1) * t]
    emb = m.modality_embed[position]
    expected = emb.missing + emb.type_embed + emb.presence.weight[0]
    torch.testing.assert_close(tokens, expected.expand_as(tokens))
    assert tokens.abs().sum() > 0


def test_a_stay_without_vectors_gets_the_missing_tokens_of_the_embedding_modality():
    spec = SPECS[1]
    m = model(spec).eval()
    samples = make_samples(spec, 3, seed=5)
    batch = collate([drop_modality(s, "note") if i == 1 else s for i, s in enumerate(samples)])
    assert batch["present"]["note"].tolist() == [True, False, True]
    t = SMALL["num_ref_points"]
    emb = m.modality_embed[2]
    with torch.no_grad():
        tokens = m.encode(batch)[:, 2 * t : 3 * t]
    torch.testing.assert_close(tokens[1], emb.missing + emb.type_embed + emb.presence.weight[0])
    assert (tokens[0] - tokens[1]).abs().max() > 1e-4


def test_a_batch_without_the_embedding_modality_scores_it_as_missing():
    """A batch with no `embeddings` entry (e.g. records scored without their vectors) gives each
    sample the prediction it gets with the modality flagged missing."""
    spec = SPECS[1]
    m = model(spec).eval()
    batch = collate(make_samples(spec, 4, seed=6))
    flagged = {**batch, "present": {**batch["present"], "note": torch.zeros(4, dtype=torch.bool)}}
    without = {k: v for k, v in batch.items() if k != "embeddings"}
    del without["present"]["note"]
    with torch.no_grad():
        torch.testing.assert_close(m(without).logits["ihm"], m(flagged).logits["ihm"])


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_the_order_of_a_stays_events_does_not_matter(spec):
    m = model(spec).eval()
    samples = make_samples(spec, 4, seed=7)
    g = torch.Generator().manual_seed(0)

    def shuffled(rec: dict) -> dict:
        order = torch.randperm(rec["times"].numel(), generator=g)
        return {k: v[order] for k, v in rec.items()}

    permuted = [
        {
            **s,
            "series": {n: shuffled(r) for n, r in s["series"].items()},
            "embeddings": {n: shuffled(r) for n, r in s["embeddings"].items()},
        }
        for s in samples
    ]
    with torch.no_grad():
        a, b = m(collate(samples)).logits["ihm"], m(collate(permuted)).logits["ihm"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate", ["laplace", "confidence"])
@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_every_parameter_gets_a_nonzero_gradient(router, gate):
    """Including each router's gate (top-K < E), every expert, encoders and missing embeddings."""
    spec = SPECS[1]
    m = model(spec, router=router, gate=gate)
    samples = make_samples(spec, 12, seed=4)
    samples = [drop_modality(s, "note") if i % 4 == 1 else s for i, s in enumerate(samples)]
    batch = collate([drop_modality(s, "labs") if i % 3 == 0 else s for i, s in enumerate(samples)])
    batch["present"]["vitals"][1] = False
    batch["present"][STATIC][2] = False
    loss_of(m, batch, spec).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_aux_loss_is_the_weighted_sum_of_balance_and_entropy_terms():
    spec = Spec()
    m = model(load_balance_weight=0.5, entropy_weight=2.0)
    out = m(random_batch(spec))
    expected = 0.5 * out.routing["load_balance"] + 2.0 * out.routing["entropy_reg"]
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    assert out.routing["expert_usage"].shape == (3, SMALL["num_experts"])  # vitals, labs, static
    assert out.routing["router_entropy"] > 0


def test_confidence_gate_adds_its_fitting_loss_only_with_labels():
    spec = Spec()
    m = model(gate="confidence")
    batch = random_batch(spec)
    assert "confidence_loss" in m(batch).routing
    batch["labels"]["ihm"][:] = math.nan
    assert "confidence_loss" not in m(batch).routing


def test_no_noise_in_eval():
    spec = Spec()
    m = model(gate_noise=5.0).eval()
    batch = random_batch(spec)
    with torch.no_grad():
        assert torch.equal(m(batch).logits["ihm"], m(batch).logits["ihm"])
        m.train()
        assert not torch.equal(m(batch).logits["ihm"], m(batch).logits["ihm"])


def test_dense_baseline_has_no_experts_and_no_aux_loss():
    spec = Spec()
    m = model(moe=False)
    assert not any("gate" in n or "experts" in n for n, _ in m.named_parameters())
    batch = random_batch(spec)
    out = m(batch)
    loss = task_loss(out.logits, batch["labels"], spec.tasks) + out.aux_loss
    loss.backward()
    assert out.aux_loss.item() == 0.0 and out.routing == {}
    assert all(p.grad is not None for p in m.parameters())


def test_multi_task_heads():
    spec = Spec(
        tasks=[
            Task("ihm", "binary"),
            Task("los_days", "regression"),
            Task("pheno", "multilabel", 5),
            Task("cls", "multiclass", 3),
        ]
    )
    m = model(spec)
    batch = random_batch(spec, n=4)
    out = m(batch)
    assert out.logits["ihm"].shape == out.logits["los_days"].shape == (4,)
    assert out.logits["pheno"].shape == (4, 5) and out.logits["cls"].shape == (4, 3)
    loss = task_loss(out.logits, batch["labels"], spec.tasks)
    assert torch.isfinite(loss)


def test_series_only_dataset_and_real_dataspec():
    from fusemoe.data.dataset import DataSpec, TaskSpec

    spec = DataSpec(
        series={"vitals": 4, "labs": 3}, static_dim=0, tasks=[TaskSpec("ihm", "binary")]
    )
    torch.manual_seed(0)
    m = FuseMoE(FuseMoEConfig(**SMALL), spec)
    batch = random_batch(Spec())
    del batch["static"], batch["present"][STATIC]
    assert m(batch).logits["ihm"].shape == (6,)


def test_config_from_params_yaml_section():
    import yaml

    with open("params.yaml") as f:
        params = yaml.safe_load(f)["model"]
    cfg = FuseMoEConfig.from_params(params)
    assert cfg.d_model == params["d_model"] and cfg.gate == params["gate"]
    with pytest.raises(ValueError, match="unknown model params"):
        FuseMoEConfig.from_params({**params, "num_expert": 3})
    with pytest.raises(ValueError, match="model.gate"):
        FuseMoEConfig.from_params({**params, "gate": "cosine"})
    paper = FuseMoEConfig()
    assert (paper.num_experts, paper.top_k, paper.d_model, paper.n_heads) == (16, 4, 128, 8)
    assert (paper.num_ref_points, paper.expert_hidden) == (48, 512)


def test_bf16_model_runs_on_fp32_batches():
    spec = Spec()
    m = model().to(torch.bfloat16)
    batch = random_batch(spec)
    out = m(batch)
    assert out.logits["ihm"].dtype == torch.bfloat16 and torch.isfinite(out.logits["ihm"]).all()
    (task_loss(out.logits, batch["labels"], spec.tasks) + out.aux_loss).backward()


def test_mtand_per_variable_attention_matches_explicit_masked_softmax():
    """The factorised attention equals a softmax over each variable's own observed times."""
    from fusemoe.nn.mtand import MTANDEncoder

    torch.manual_seed(0)
    enc = MTANDEncoder(num_vars=3, d_model=8, n_heads=2, num_ref_points=5)
    values, mask = torch.randn(2, 7, 3), (torch.rand(2, 7, 3) < 0.5).float()
    mask[0, :, 2] = 0  # a never-observed variable
    mask[1, 5:] = 0  # padding rows
    times = torch.rand(2, 7) * 48
    ref = enc.time_embed(enc.ref_times)
    q = enc.query(ref).view(5, 2, 4).transpose(0, 1)
    k = enc.key(enc.time_embed(times)).view(2, 7, 2, 4).transpose(1, 2)
    scores = torch.einsum("htc,bhlc->bhtl", q, k) / 2.0
    expected = torch.zeros(2, 2, 5, 3)
    for b in range(2):
        for v in range(3):
            obs = mask[b, :, v] > 0
            if obs.any():
                a = scores[b][..., obs].softmax(-1)  # [h, T, n_obs]
                expected[b, :, :, v] = a @ values[b, obs, v]
    with torch.no_grad():  # make the output projection expose the value channel of each head
        enc.proj.weight.zero_()
        enc.proj.bias.zero_()
        enc.position.weight.zero_()
        enc.position.bias.zero_()
        # Feature layout per token: heads x [value (V), density (V)]; pick head h value v.
        for h in range(2):
            for v in range(3):
                enc.proj.weight[h * 3 + v, h * 6 + v] = 1.0
    out = enc(values, mask, times)[..., :6].view(2, 5, 2, 3).permute(0, 2, 1, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_mtand_gradients_stay_finite_when_attention_is_sharp():
    """A variable observed only where attention has ~0 mass must not turn gradients into NaN
    (its normaliser underflows toward 0; P12 training hit this after 6 epochs). Sharpness is
    swept so that the normaliser passes through fp32's tiny and subnormal range."""
    from fusemoe.nn.mtand import MTANDEncoder

    torch.manual_seed(0)
    base = MTANDEncoder(num_vars=2, d_model=8, n_heads=2, num_ref_points=5)
    values, mask = torch.randn(1, 6, 2), torch.zeros(1, 6, 2)
    mask[0, :5, 0] = 1.0
    mask[0, 5, 1] = 1.0  # variable 1 seen once, at a time the attention all but ignores
    times = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 47.0]])
    for scale in torch.linspace(1.0, 60.0, 120).tolist():
        enc = copy.deepcopy(base)
        with torch.no_grad():
            enc.query.weight.mul_(scale)
            enc.key.weight.mul_(scale)
        x = values.clone().requires_grad_()
        enc(x, mask, times).square().sum().backward()
        for name, p in enc.named_parameters():
            assert torch.isfinite(p.grad).all(), (scale, name)
        assert torch.isfinite(x.grad).all(), scale


def test_mtand_count_features_tell_sparse_from_dense_sampling():
    """One variable with the same value read 3 or 6 times over the same hours: the relative
    density channel cannot tell them apart, the log-count channel can."""
    from fusemoe.nn.mtand import MTANDEncoder

    def series(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.full((1, n, 1), 0.7), torch.ones(1, n, 1), torch.linspace(2.0, 4.0, n)[None]

    def encode_both(count_features: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        enc = MTANDEncoder(
            num_vars=1, d_model=8, n_heads=2, num_ref_points=4, count_features=count_features
        )
        with torch.no_grad():  # constant time keys: attention spreads evenly over the readings
            enc.key.weight.zero_()
            return enc(*series(3)), enc(*series(6))

    sparse, dense = encode_both(count_features=False)
    torch.testing.assert_close(sparse, dense)
    sparse, dense = encode_both(count_features=True)
    assert (sparse - dense).abs().max().item() > 1e-3


def test_dropout_keeps_a_value_with_probability_one_minus_p_and_rescales_it():
    from fusemoe.nn.model import Dropout

    drop = Dropout(0.25)
    torch.manual_seed(0)
    y = drop(torch.ones(200_000))
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 0.005 is ~5 standard errors
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    x = torch.randn(5, 3, requires_grad=True)
    drop(x).sum().backward()  # the gradient is the same mask, rescaled
    assert set(x.grad.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


def test_value_clip_bounds_what_the_encoders_see_and_nothing_else():
    spec = Spec()
    torch.manual_seed(0)
    clipped = FuseMoE(FuseMoEConfig(**SMALL, value_clip=30.0), spec).eval()
    plain = FuseMoE(FuseMoEConfig(**SMALL), spec).eval()
    plain.load_state_dict(clipped.state_dict())
    batch = random_batch(spec, n=4)
    outlier, at_bound = copy.deepcopy(batch), copy.deepcopy(batch)
    outlier["series"]["vitals"]["values"][0, 0, 0] = 1000.0  # an observed value
    at_bound["series"]["vitals"]["values"][0, 0, 0] = 30.0  # the random values are all within
    outlier["static"]["values"][1, 0] = -500.0
    at_bound["static"]["values"][1, 0] = -30.0
    with torch.no_grad():
        assert torch.equal(clipped(outlier).logits["ihm"], plain(at_bound).logits["ihm"])
        assert not torch.equal(plain(outlier).logits["ihm"], plain(at_bound).logits["ihm"])
