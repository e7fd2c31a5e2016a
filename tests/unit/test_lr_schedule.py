import math

import pytest

from fusemoe.loop import lr_factor


def test_constant_schedule_keeps_the_base_rate_after_warmup():
    assert [lr_factor(s, 100, "constant", warmup_steps=4) for s in range(6)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]


def test_cosine_schedule_warms_up_then_decays_monotonically_to_five_percent():
    factors = [lr_factor(s, 100, "cosine", warmup_steps=10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    after = factors[10:]
    assert after[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(after[:-1], after[1:], strict=True))
    assert after[-1] == pytest.approx(0.05)
    assert factors[55] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_schedule_names_the_param():
    with pytest.raises(ValueError, match="train.lr_schedule='linear'"):
        lr_factor(0, 10, "linear")
