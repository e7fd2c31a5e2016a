"""Gates: top-K selection and weights, distance semantics, fp32 stability, noise only in training."""

import pytest
import torch

from fusemoe.nn.gates import GATE_TYPES, LaplaceGate, make_gate

# Tiny tensors: one intra-op thread avoids OpenMP spin contention on the shared 2-core machine.
torch.set_num_threads(1)

D, E, K = 16, 6, 3


@pytest.mark.parametrize("kind", GATE_TYPES)
def test_topk_weights_sum_to_one_and_pick_the_largest_logits(kind):
    torch.manual_seed(0)
    gate = make_gate(kind, D, E, K)
    out = gate(torch.randn(50, D))
    assert out.logits.shape == out.probs.shape == (50, E)
    assert out.topk_idx.shape == out.topk_weights.shape == (50, K)
    assert out.topk_idx.dtype == torch.long
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(50))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(50))
    # K distinct experts per token, and no unselected expert has a larger logit than a selected one.
    assert (out.topk_idx.sort(-1).values.diff(dim=-1) > 0).all()
    selected_min = out.logits.gather(1, out.topk_idx).min(-1).values
    unselected = out.logits.scatter(1, out.topk_idx, float("-inf"))
    assert (unselected.max(-1).values <= selected_min).all()
    # Weights follow the logits' order.
    sel_logits = out.logits.gather(1, out.topk_idx)
    assert (sel_logits.argmax(-1) == out.topk_weights.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_distance_gates_prefer_the_nearest_expert(kind):
    gate = make_gate(kind, 2, 3, 1)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    x = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 8.0], [6.0, 0.0]])
    assert gate(x).topk_idx[:, 0].tolist() == [0, 1, 2, 1]
    squared = torch.tensor([2.0, 82.0, 82.0])  # ||x_0 - w_e||^2
    expected = -squared.sqrt() if kind == "laplace" else -squared
    torch.testing.assert_close(gate(x).logits[0], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_laplace_distances_are_stable_for_near_points(dtype):
    """Tokens of norm ~30 at distance ~1e-2 from an expert key: the fp32 direct difference keeps the
    distance; the expansion ||x||^2 + ||w||^2 - 2 x.w in the input dtype loses it entirely."""
    torch.manual_seed(0)
    x = (torch.randn(8, 128) * 3).to(dtype)
    gate = LaplaceGate(128, 4, 2)
    offsets = torch.randn(4, 128) * 1e-3
    with torch.no_grad():
        gate.weight.copy_(x[0].float() + offsets)
    logits = gate(x).logits
    assert logits.dtype == torch.float32
    exact = -torch.cdist(
        x.double(), gate.weight.double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-6)
    near = -logits[0]  # distances ~1e-2
    assert ((near - offsets.norm(dim=-1)).abs() / offsets.norm(dim=-1)).max() < 1e-3
    # What a naive expansion in the input dtype gives for the same near distances:
    w = gate.weight.detach().to(dtype)
    sq = (x[:1] * x[:1]).sum(-1, keepdim=True) + (w * w).sum(-1) - 2 * x[:1] @ w.t()
    naive = sq.float().clamp_min(0).sqrt()[0]
    assert ((naive - offsets.norm(dim=-1)).abs() / offsets.norm(dim=-1)).max() > 0.5


@pytest.mark.parametrize("kind", GATE_TYPES)
def test_gate_logits_are_fp32_for_bf16_inputs(kind):
    gate = make_gate(kind, D, E, K).to(torch.bfloat16)
    out = gate(torch.randn(5, D, dtype=torch.bfloat16))
    assert out.logits.dtype == out.probs.dtype == out.topk_weights.dtype == torch.float32


def test_noise_only_in_training():
    torch.manual_seed(0)
    gate = make_gate("laplace", D, E, K, noise_std=1.0)
    x = torch.randn(200, D)
    gate.eval()
    a, b = gate(x), gate(x)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weights, b.topk_weights)
    assert torch.equal(a.topk_idx, a.logits.topk(K, -1).indices)
    gate.train()
    noisy = gate(x)
    assert not torch.equal(noisy.topk_idx, a.topk_idx)
    torch.testing.assert_close(noisy.probs, a.probs)  # the loss distribution is noise-free


@pytest.mark.parametrize("kind", GATE_TYPES)
@pytest.mark.parametrize("k", [1, 2])
def test_gate_gets_gradient_through_the_mixing_weights(kind, k):
    torch.manual_seed(0)
    gate = make_gate(kind, D, E, k)
    out = gate(torch.randn(40, D))
    (out.topk_weights * torch.randn(40, k)).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_unknown_gate_and_bad_top_k_are_errors():
    with pytest.raises(ValueError, match="unknown gate"):
        make_gate("cosine", D, E, K)
    with pytest.raises(ValueError, match="top_k"):
        make_gate("softmax", D, E, E + 1)
