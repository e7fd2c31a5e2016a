"""MoE layer: routers are trained, routing is per token, stats are well formed, dense baseline."""

import pytest
import torch

from fusemoe.nn.moe import ROUTER_TYPES, DenseFFN, MoELayer

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
    assert out.entropy_reg <= 1e-6  # -I(modality; expert)
    assert out.conf_logits is None


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
