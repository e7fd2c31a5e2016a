"""The DeepSpeed MoE backend routed by our gates computes the same layer as our Experts."""

import pytest
import torch

pytest.importorskip("deepspeed")

from fusemoe.nn.experts import Experts  # noqa: E402
from fusemoe.nn.gates import make_gate  # noqa: E402
from fusemoe.parallel.deepspeed_moe import DeepSpeedMoELayer  # noqa: E402

pytestmark = pytest.mark.slow

N, D, H, E = 64, 16, 32, 8


@pytest.mark.parametrize("gate_kind,k", [("softmax", 1), ("laplace", 2), ("gaussian", 4)])
def test_dropless_deepspeed_backend_with_our_gate_equals_our_experts(gate_kind, k):
    torch.manual_seed(0)
    gate = make_gate(gate_kind, D, E, k)
    experts = Experts(E, D, H)
    layer = DeepSpeedMoELayer(D, H, E, k, gate=gate)
    layer.load_experts(experts)
    x = torch.randn(N, D)

    y, l_aux = layer(x)
    routing = gate(x)
    torch.testing.assert_close(y, experts(x, routing.topk_idx, routing.topk_weights))
    assert torch.isfinite(l_aux)
    y.square().sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_capacity_limited_deepspeed_backend_drops_routes_beyond_capacity():
    torch.manual_seed(0)
    gate = make_gate("softmax", D, E, 2)
    layer = DeepSpeedMoELayer(D, H, E, 2, gate=gate, capacity_factor=0.5)
    x = torch.randn(N, D)
    _, capacity, _, indices, locations, weights, counts = layer.moe.deepspeed_moe.gate(x)
    kept = indices >= 0
    assert int(capacity) == N // E  # ceil(64 / 8 * 0.5 * 2)
    assert (locations[kept] < capacity).all() and (weights[~kept] == 0).all()
    assert kept.sum() < counts.sum()  # something was dropped
