"""Experts: the sorted, dropless dispatch equals a plain per-expert loop, forward and backward."""

import pytest
import torch

from fusemoe.nn.experts import Experts, expert_counts, reference_moe, resolve_backend

E, D, H, N, K = 6, 8, 16, 40, 2
BACKENDS = ["grouped", "loop", "auto"]


def routing(n: int = N, k: int = K, num_experts: int = E, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    logits = torch.randn(n, num_experts, generator=g)
    top, idx = logits.topk(k, dim=-1)
    return x, idx, top.softmax(-1)


def grads(module: Experts, out: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    gs = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    return gs


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_matches_per_expert_loop_forward_and_backward(backend):
    torch.manual_seed(0)
    experts = Experts(E, D, H, backend=backend)
    x, idx, w = routing()
    x.requires_grad_(True)

    out = experts(x, idx, w)
    got = grads(experts, out, x)
    ref = reference_moe(x, idx, w, experts.w1, experts.b1, experts.w2, experts.b2)
    want = grads(experts, ref, x)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_that_receive_no_tokens_are_fine_and_get_zero_grad(backend):
    torch.manual_seed(0)
    experts = Experts(E, D, H, backend=backend)
    x, _, w = routing()
    idx = torch.stack([torch.full((N,), 1), torch.full((N,), 4)], dim=-1)  # experts 0,2,3,5 idle
    out = experts(x, idx, w)
    torch.testing.assert_close(
        out, reference_moe(x, idx, w, experts.w1, experts.b1, experts.w2, experts.b2)
    )
    out.sum().backward()
    for e in range(E):
        used = e in (1, 4)
        assert (experts.w1.grad[e].abs().sum() > 0) == used
        assert (experts.b2.grad[e].abs().sum() > 0) == used


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_used_expert(backend):
    torch.manual_seed(0)
    experts = Experts(E, D, H, backend=backend)
    x, idx, w = routing()
    experts(x, idx, w).square().sum().backward()
    for e in idx.unique().tolist():
        for p in experts.parameters():
            assert p.grad[e].abs().sum() > 0, f"expert {e} got no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_linear_in_the_gate_weights(backend):
    torch.manual_seed(0)
    experts = Experts(E, D, H, backend=backend)
    x, idx, w = routing()
    torch.testing.assert_close(experts(x, idx, 3.0 * w), 3.0 * experts(x, idx, w))
    torch.testing.assert_close(experts(x, idx, torch.zeros_like(w)), torch.zeros(N, D))
    # Token n's output is the weighted sum of its experts' FFNs, each computed alone.
    one = experts(x, idx[:, :1], torch.ones(N, 1))
    two = experts(x, idx[:, 1:], torch.ones(N, 1))
    torch.testing.assert_close(
        experts(x, idx, w), w[:, :1] * one + w[:, 1:] * two, rtol=1e-5, atol=1e-6
    )


def test_a_token_is_not_affected_by_the_rest_of_the_batch():
    torch.manual_seed(0)
    experts = Experts(E, D, H)
    x, idx, w = routing()
    alone = torch.cat([experts(x[i : i + 1], idx[i : i + 1], w[i : i + 1]) for i in range(N)])
    torch.testing.assert_close(experts(x, idx, w), alone, rtol=1e-5, atol=1e-6)


def test_expert_counts_has_one_slot_per_expert_even_when_unused():
    counts = expert_counts(torch.tensor([3, 3, 0]), num_experts=5)
    assert counts.tolist() == [1, 0, 0, 2, 0]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        Experts(E, D, H, backend="einsum")
    assert resolve_backend("loop", torch.device("cpu"), torch.float32) == "loop"


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_ffn_on_zero_rows_works_forward_and_backward(backend):
    # An expert-parallel rank can receive no rows at all in a step.
    experts = Experts(E, D, H, backend=backend)
    rows = torch.zeros(0, D, requires_grad=True)
    out = experts.ffn(rows, torch.zeros(E, dtype=torch.long))
    assert out.shape == (0, D)
    out.sum().backward()
    assert rows.grad.shape == (0, D)
