"""Losses: entropy regularizer sign and definition, load balance, multi-task loss with NaN labels."""

import math

import pytest
import torch

from fusemoe.nn.losses import entropy, entropy_regularizer, load_balance_loss, task_loss

# Tiny tensors: one intra-op thread avoids OpenMP spin contention on the shared 2-core machine.
torch.set_num_threads(1)


def test_entropy_regularizer_is_zero_when_all_modalities_route_alike():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert entropy_regularizer(p.repeat(3, 1)).abs() < 1e-6


def test_entropy_regularizer_is_minus_the_modality_expert_mutual_information():
    """(1/M) sum_j H(p_j) - H(mean_j p_j) <= 0 (concavity of H): negative when routers differ,
    most negative (-log M) when each modality has its own expert."""
    differ = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    assert entropy_regularizer(differ) < -0.1
    one_expert_each = torch.eye(3, 4)
    torch.testing.assert_close(entropy_regularizer(one_expert_each), torch.tensor(-math.log(3)))
    # Matches the formula written out.
    expected = entropy(differ).mean() - entropy(differ.mean(0))
    torch.testing.assert_close(entropy_regularizer(differ), expected)
    # Minimizing it moves the modalities apart: its gradient pushes p_0 away from p_1.
    logits = torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.2]], requires_grad=True)
    entropy_regularizer(logits.softmax(-1)).backward()
    assert logits.grad[0, 0] < 0 and logits.grad[1, 3] < 0  # descent increases these logits


def test_load_balance_is_one_when_uniform_and_larger_when_collapsed():
    e = 4
    uniform = torch.full((8, e), 1 / e)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(load_balance_loss(uniform, idx), torch.tensor(1.0))
    collapsed = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).repeat(8, 1)
    assert load_balance_loss(collapsed, torch.tensor([[0, 1]] * 8)) == pytest.approx(2.0)


def test_task_loss_multi_task_ignores_nan_labels():
    tasks = [
        ("ihm", "binary"),
        ("los", "regression"),
        ("pheno", "multilabel"),
        ("cls", "multiclass"),
    ]
    logits = {
        "ihm": torch.tensor([2.0, -1.0, 0.5]),
        "los": torch.tensor([1.0, 2.0, 3.0]),
        "pheno": torch.tensor([[1.0, -1.0], [0.0, 0.0], [3.0, 3.0]]),
        "cls": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    }
    nan = math.nan
    labels = {
        "ihm": torch.tensor([1.0, nan, 0.0]),
        "los": torch.tensor([nan, nan, 3.5]),
        "pheno": torch.tensor([[1.0, nan], [0.0, 1.0], [nan, nan]]),
        "cls": torch.tensor([0.0, nan, 2.0]),
    }
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = torch.stack(
        [
            bce(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])),
            torch.tensor(0.5 * 0.5**2),  # Huber, |error| 0.5 < delta 1
            bce(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])),
            torch.nn.functional.cross_entropy(logits["cls"][[0, 2]], torch.tensor([0, 2])),
        ]
    ).mean()
    torch.testing.assert_close(task_loss(logits, labels, tasks), expected)


def test_task_loss_with_no_labels_is_a_differentiable_zero():
    out = torch.randn(4, requires_grad=True)
    loss = task_loss({"ihm": out}, {"ihm": torch.full((4,), math.nan)}, [("ihm", "binary")])
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(out.grad, torch.zeros(4))
