"""MoE layer: routers are trained, routing is per token, stats are well formed, the balance and
entropy terms take their hand-computed values, dense baseline."""

import math

import pytest
import torch

from fusemoe.nn.moe import BALANCE_SCOPES, ROUTER_TYPES, DenseFFN, MoELayer

# Tiny tensors: one intra-op thread avoids OpenMP spin contention on the shared 2-core machine.
torch.set_num_threads(1)

D, H, E, K = 16, 24, 4, 2
TOKENS = [5, 5, 1]  # two series modalities of 5 tokens and a static token, per sample


def layer(router: str, gate: str = "laplace", **kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, H, E, K, TOKENS, gate=gate, router=router, **kw)


@pytest.mark.parametrize("gate", ["laplace", "softmax"])
@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_every_router_and_expert_parameter_gets_a_nonzero_gradient(router, gate):
    moe = layer(router, gate)
    x = torch.randn(16, sum(TOKENS), D) * 2
    out = moe(x)
    (out.out * torch.randn_like(out.out)).sum().backward()
    assert len(moe.gates) == (1 if router == "joint" else 3)
    assert len(moe.experts) == (3 if router == "disjoint" else 1)
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Every expert received tokens (so each expert's slice of the stacked weights got gradient).
    for ex in moe.experts:
        assert (ex.w1.grad.flatten(1).abs().sum(-1) > 0).all()


@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_gate_gradient_comes_from_the_task_output_alone(router):
    """top-K < E: the gate is trained by the output, not only by the auxiliary losses."""
    moe = layer(router)
    out = moe(torch.randn(8, sum(TOKENS), D))
    out.out.square().mean().backward()
    for g in moe.gates:
        assert g.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_routing_is_per_token_so_samples_do_not_interact(router):
    moe = layer(router, gate_noise=1.0).eval()
    x = torch.randn(6, sum(TOKENS), D)
    together = moe(x).out
    for i in range(6):
        torch.testing.assert_close(moe(x[i : i + 1]).out, together[i : i + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_stats_shapes_and_usage_fractions(router):
    out = layer(router)(torch.randn(4, sum(TOKENS), D))
    assert out.out.shape == (4, sum(TOKENS), D)
    assert out.usage.shape == (3, E)
    torch.testing.assert_close(out.usage.sum(-1), torch.ones(3))
    assert out.load_balance.shape == out.entropy_reg.shape == out.router_entropy.shape == ()
    assert out.conf_logits is None


def split_routing_layer(balance_scope: str) -> tuple[MoELayer, torch.Tensor]:
    """Two modalities of 4 tokens, top-1 softmax routers, and tokens that alternate between two
    directions u, v: modality 0 sends u-tokens to expert 0 and v-tokens to expert 1, modality 1
    uses experts 2 and 3. So each modality specialises on half the experts and, pooled, every
    expert gets a quarter of the tokens: what the entropy regularizer asks for."""
    torch.manual_seed(0)
    moe = MoELayer(D, H, E, 1, [4, 4], gate="softmax", balance_scope=balance_scope)
    with torch.no_grad():
        for g in moe.gates:
            g.weight.zero_()
        moe.gates[0].weight[0, 0] = moe.gates[0].weight[1, 1] = 30.0
        moe.gates[1].weight[2, 0] = moe.gates[1].weight[3, 1] = 30.0
    x = torch.zeros(3, 8, D)
    x[:, 0::2, 0] = 1.0  # u
    x[:, 1::2, 1] = 1.0  # v
    return moe, x


def test_pooled_balance_is_uniform_when_modalities_split_the_experts_evenly():
    moe, x = split_routing_layer("expert_set")
    out = moe(x)
    expected_usage = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    torch.testing.assert_close(out.usage, expected_usage)
    # E * sum_e f_e P_e over all 8 tokens per sample: f = P = 1/4 -> 1, its uniform value.
    torch.testing.assert_close(out.load_balance, torch.tensor(1.0), atol=1e-6, rtol=0)
    # The entropy term is at its minimum for two modalities at the same time: -I = -log 2.
    # (p_j is modality j's mean routing distribution; per-token one-hot p's would give -log 4.)
    torch.testing.assert_close(out.entropy_reg, torch.tensor(-math.log(2)), atol=1e-6, rtol=0)


def test_per_router_balance_penalises_the_split_the_entropy_term_wants():
    """The former term: each router over all 4 experts sees f = P = 1/2 on two of them, so
    E * sum f P = 2 = M times uniform, although the shared experts are perfectly balanced."""
    moe, x = split_routing_layer("router")
    torch.testing.assert_close(moe(x).load_balance, torch.tensor(2.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["joint", "disjoint"])
def test_balance_scope_changes_nothing_without_routers_sharing_an_expert_set(router):
    x = torch.randn(4, sum(TOKENS), D)
    pooled, per_router = (layer(router, balance_scope=s)(x).load_balance for s in BALANCE_SCOPES)
    torch.testing.assert_close(pooled, per_router)


def test_entropy_term_is_zero_when_every_modality_routes_alike():
    moe = layer("per_modality", gate="softmax")
    with torch.no_grad():
        for g in moe.gates[1:]:
            g.weight.copy_(moe.gates[0].weight)
    token = torch.randn(D)
    out = moe(token.expand(2, sum(TOKENS), D).clone())  # every token of every modality alike
    assert out.entropy_reg.abs() < 1e-6


def test_minimising_the_entropy_term_makes_modalities_route_apart():
    """Its gradient reaches every router, and a small step against it lowers it (more mutual
    information between modality and expert); a sign error would make routing more alike."""
    moe = layer("per_modality", gate="softmax")
    x = torch.randn(8, sum(TOKENS), D)
    before = moe(x).entropy_reg
    before.backward()
    with torch.no_grad():
        for g in moe.gates:
            assert g.weight.grad.abs().sum() > 0
            g.weight -= 5.0 * g.weight.grad
    assert before < 0 and moe(x).entropy_reg < 1.5 * before


def test_confidence_gate_exposes_the_selected_confidences():
    out = layer("per_modality", gate="confidence")(torch.randn(3, sum(TOKENS), D))
    assert out.conf_logits.shape == (3, sum(TOKENS), K)


def test_wrong_token_count_is_an_error():
    with pytest.raises(ValueError, match="tokens per sample"):
        layer("joint")(torch.randn(2, 4, D))


def test_dense_ffn_baseline():
    ffn = DenseFFN(D, H)
    x = torch.randn(3, 7, D, requires_grad=True)
    y = ffn(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.abs().sum() > 0
