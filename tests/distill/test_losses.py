"""The distillation losses against hand-written torch references (explicit softmax sums and
squared differences), on fresh random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from llmc.distill.losses import hidden_mse, hidden_pairs, kd_ce_loss, kd_loss, next_token_loss


def _kd_reference(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean over positions of sum_v p_t(v) * (log p_t(v) - log p_s(v)), written out."""
    total = torch.zeros((), dtype=torch.float64)
    rows = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    for srow, trow in zip(*rows):
        ps = torch.exp(srow / T) / torch.exp(srow / T).sum()
        pt = torch.exp(trow / T) / torch.exp(trow / T).sum()
        total += (pt * (torch.log(pt) - torch.log(ps))).sum()
    return T * T * total / rows[0].shape[0]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_loss_matches_reference(T):
    g = torch.Generator().manual_seed(int(T * 10))
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    torch.testing.assert_close(kd_loss(s, t, T).double(), _kd_reference(s, t, T), rtol=1e-5, atol=1e-6)


def test_kd_loss_is_zero_only_at_the_teacher():
    t = torch.randn(2, 4, 9)
    assert kd_loss(t.clone(), t, 2.0).abs() < 1e-6
    assert kd_loss(t + 5.0, t, 2.0).abs() < 1e-5  # a shift of every logit is the same distribution
    assert kd_loss(torch.randn(2, 4, 9), t, 2.0) > 1e-3


def test_kd_gradient_matches_reference():
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7)
    kd_loss(s, t, 3.0).backward()
    s_ref = s.detach().clone().requires_grad_(True)
    _kd_reference(s_ref, t, 3.0).backward()
    torch.testing.assert_close(s.grad, s_ref.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,kd_w,ce_w", [(1.0, 1.0, 1.0), (2.0, 0.7, 0.3), (1.0, 1.0, 0.0), (3.0, 0.0, 1.0)])
def test_fused_kd_ce_equals_the_separate_losses_in_value_and_gradient(T, kd_w, ce_w):
    g = torch.Generator().manual_seed(int(T * 7 + kd_w * 3 + ce_w))
    s = (torch.randn(3, 5, 13, generator=g) * 3).requires_grad_(True)
    t = torch.randn(3, 5, 13, generator=g) * 3
    y = torch.randint(0, 13, (3, 5), generator=g)
    fused = kd_ce_loss(s, t, y, T, kd_w, ce_w)
    (fused * 1.7).backward()
    s_ref = s.detach().clone().requires_grad_(True)
    ref = kd_w * _kd_reference(s_ref, t, T) + ce_w * next_token_loss(s_ref.double(), y)
    (ref * 1.7).backward()
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad.float(), rtol=1e-5, atol=1e-6)


def test_hidden_mse_matches_reference():
    g = torch.Generator().manual_seed(3)
    student = tuple(torch.randn(2, 6, 8, generator=g) for _ in range(3))  # embeddings + 2 blocks
    teacher = tuple(torch.randn(2, 6, 8, generator=g) * (i + 1) for i in range(5))  # embeddings + 4 blocks
    pairs = [(1, 3), (2, 4)]
    want = 0.0
    for si, ti in pairs:
        num = sum(float((a - b) ** 2) for a, b in zip(student[si].flatten(), teacher[ti].flatten()))
        den = sum(float(b) ** 2 for b in teacher[ti].flatten())
        want += num / den  # (sum / n) / (sum / n): relative to the teacher state's mean square
    assert math.isclose(float(hidden_mse(student, teacher, pairs)), want / len(pairs), rel_tol=1e-5)


def test_hidden_pairs_map_each_block_to_where_the_next_kept_layer_starts():
    assert hidden_pairs((0, 2), 4) == [(1, 2), (2, 4)]
    assert hidden_pairs((1, 3), 4) == [(1, 3), (2, 4)]
    assert hidden_pairs((0, 1, 2, 3), 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]  # keep-all: each block to itself
    assert hidden_pairs((2,), 6) == [(1, 6)]


def test_next_token_loss_matches_reference():
    logits, y = torch.randn(2, 5, 13), torch.randint(0, 13, (2, 5))
    want = -torch.stack([torch.log_softmax(logits[b, i].double(), -1)[y[b, i]]
                         for b in range(2) for i in range(5)]).mean()
    torch.testing.assert_close(next_token_loss(logits, y).double(), want, rtol=1e-6, atol=1e-7)
