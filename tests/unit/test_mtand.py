"""mTAND's per-variable attention average is exact however little attention a variable gets."""

import copy
import math

import torch

from fusemoe.nn.mtand import MTANDEncoder

torch.set_num_threads(1)

# Variable 0 is seen often early on; variable 1 twice, late, with different values, so its exact
# average is a genuine mix of 2.0 and -1.0 decided by its own two scores.
TIMES = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 40.0, 47.0]])
VALUES = torch.tensor([[[0.3, 0.0]] * 5 + [[0.0, 2.0], [0.0, -1.0]]])
MASK = torch.tensor([[[1.0, 0.0]] * 5 + [[0.0, 1.0], [0.0, 1.0]]])


def sharpened(scale: float) -> MTANDEncoder:
    torch.manual_seed(0)
    enc = MTANDEncoder(num_vars=2, d_model=8, n_heads=2, num_ref_points=5)
    with torch.no_grad():
        enc.query.weight.mul_(scale)
        enc.key.weight.mul_(scale)
    return enc


def value_channel(enc: MTANDEncoder, values: torch.Tensor = VALUES) -> torch.Tensor:
    """The encoder's interpolated values [B, h, T, V], read through its output: a copy whose
    projection passes head h's value of variable v straight to output unit h * V + v."""
    e = copy.deepcopy(enc)
    h, v = e.n_heads, 2
    with torch.no_grad():
        for lin in (e.proj, e.position):
            lin.weight.zero_()
            lin.bias.zero_()
        for i in range(h):  # feature layout per token: heads x [value (V), density (V)]
            for j in range(v):
                e.proj.weight[i * v + j, i * 2 * v + j] = 1.0
    out = e(values, MASK, TIMES)[..., : h * v]  # [B, T, h * V]
    return out.view(1, -1, h, v).permute(0, 2, 1, 3)


def float64_reference(
    enc: MTANDEncoder, values: torch.Tensor = VALUES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, mass) [B, h, T, V] from a softmax over each variable's own rows, in float64."""
    e = copy.deepcopy(enc).double()
    values = values.double()
    h, dk = e.n_heads, e.head_dim
    q = e.query(e.time_embed(e.ref_times)).view(-1, h, dk).transpose(0, 1)
    k = e.key(e.time_embed(TIMES.double())).view(1, -1, h, dk).transpose(1, 2)
    scores = torch.einsum("htc,bhlc->bhtl", q, k) / math.sqrt(dk)
    value, mass = [], []
    for v in range(2):
        obs = MASK[0, :, v] > 0
        value.append(scores[0][..., obs].softmax(-1) @ values[0, obs, v])
        mass.append(scores[0].softmax(-1)[..., obs].sum(-1))
    return torch.stack(value, -1)[None], torch.stack(mass, -1)[None]


def test_a_variable_with_vanishing_attention_mass_gets_its_exact_average():
    """Sharpening the attention drives variable 1's mass through 1e-6 (where the normaliser used
    to be floored, shrinking the value toward 0, the training mean), 1e-12 and fp32 underflow;
    its average must stay the float64 softmax over its own two observations."""
    smallest = []
    for scale in torch.linspace(1.0, 60.0, 30).tolist():
        enc = sharpened(scale)
        with torch.no_grad():
            value = value_channel(enc)
        expected, mass = float64_reference(enc)
        smallest.append(mass[..., 1].min().item())
        torch.testing.assert_close(value.double(), expected, atol=1e-4, rtol=1e-4, msg=str(scale))
    # The sweep covered every regime: ordinary, below the old floor, and lost to fp32 underflow.
    assert max(smallest) > 1e-3 and min(smallest) < 1e-45
    assert any(1e-12 < m < 1e-6 for m in smallest)


def test_exact_average_is_the_same_alone_and_next_to_another_sample():
    enc = sharpened(30.0).eval()  # variable 1's mass ~1e-17: the recomputed path
    torch.manual_seed(1)
    other = (torch.randn(1, 7, 2), (torch.rand(1, 7, 2) < 0.6).float(), torch.rand(1, 7) * 48)
    with torch.no_grad():
        alone = enc(VALUES, MASK, TIMES)
        pair = enc(
            torch.cat([other[0], VALUES]), torch.cat([other[1], MASK]), torch.cat([other[2], TIMES])
        )
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)


def test_gradients_through_the_exact_path_match_float64():
    """The recomputed entries are differentiable and their gradient is the float64 one."""
    enc = sharpened(40.0)
    x = VALUES.clone().requires_grad_()
    value = value_channel(enc, x)
    _, mass = float64_reference(enc)
    assert (mass[..., 1] < 1e-12).any()  # the exact path is taken
    value[..., 1].sum().backward()
    ref = VALUES.double().clone().requires_grad_()
    float64_reference(enc, ref)[0][..., 1].sum().backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)
    assert x.grad[0, 5:, 1].sum() > 1  # d(sum of averages)/dx: the weights, summed over h, T


def test_a_key_bias_never_changes_the_encoding_so_models_saved_with_one_still_load():
    """Older models have a key bias: q . b_k is the same for every key time of a query, so the
    softmax over key times ignores it; the encoder dropped it and loads such models unchanged."""
    enc = sharpened(1.0)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 3
    loaded = MTANDEncoder(num_vars=2, d_model=8, n_heads=2, num_ref_points=5)
    loaded.load_state_dict(enc.state_dict() | {"key.bias": bias})  # strict: nothing else differs
    with_bias = copy.deepcopy(enc).double()
    with_bias.key = torch.nn.Linear(8, 8).double()
    with torch.no_grad():
        with_bias.key.weight.copy_(enc.key.weight)
        with_bias.key.bias.copy_(bias)
    value, _ = float64_reference(with_bias)
    assert torch.allclose(value_channel(loaded).double(), value, atol=1e-5)
