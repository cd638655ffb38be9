"""Chunked per-token log-probs (posttrain.ops.logprobs) against log_softmax and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.ops.logprobs import IGNORE_INDEX, sequence_log_probs, token_log_probs

TOL = {"rtol": 1e-6, "atol": 1e-6}


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B=2, T=5, V=7) and targets with some ignored positions."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, 0] = IGNORE_INDEX
    targets[1, 3:] = IGNORE_INDEX
    return logits, targets


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full log_softmax in fp64, gathered, zero at ignored targets."""
    full = torch.log_softmax(logits.double(), dim=-1)
    picked = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(picked), picked).float()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 128])
def test_token_log_probs_match_log_softmax_for_any_chunk(chunk):
    logits, targets = tiny_batch()
    out = token_log_probs(logits, targets, chunk=chunk)
    assert out.shape == (2, 5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(logits, targets), **TOL)


def test_ignored_targets_give_exactly_zero():
    logits, targets = tiny_batch(seed=1)
    out = token_log_probs(logits, targets, chunk=2)
    ignored = targets == IGNORE_INDEX
    assert ignored.sum().item() == 3
    assert (out[ignored] == 0).all()
    assert (out[~ignored] < 0).all()  # every real target has p < 1


def test_ignored_positions_get_no_gradient():
    logits, targets = tiny_batch(seed=2)
    logits.requires_grad_()
    token_log_probs(logits, targets, chunk=2).sum().backward()
    ignored = targets == IGNORE_INDEX
    assert (logits.grad[ignored] == 0).all()
    # at a real target: d log softmax(z)[y] / dz = onehot(y) - softmax(z)
    b, pos = 0, 1
    expected = -torch.softmax(logits.detach()[b, pos], -1)
    expected[targets[b, pos]] += 1
    torch.testing.assert_close(logits.grad[b, pos], expected, **TOL)


def test_token_log_probs_hand_values():
    # logits (0, ln 3): softmax = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, math.log(3)]]])
    targets = torch.tensor([[1, 0, IGNORE_INDEX]])
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 4), 0.0]])  # -0.2876821, -1.3862944, 0
    for chunk in (1, 2, 4):
        torch.testing.assert_close(token_log_probs(logits, targets, chunk=chunk), expected, **TOL)


def test_sequence_log_probs_uniform_logits():
    # V = 4 and uniform logits: every target has p = 1/4, log p = -ln 4 = -1.3862944
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor(
        [
            [IGNORE_INDEX, 1, 2, 3],  # 3 completion targets after the shift -> -3·ln 4 = -4.1588831
            [IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX],  # 1 target -> -ln 4
        ]
    )
    total, count = sequence_log_probs(logits, labels)
    torch.testing.assert_close(total, torch.tensor([-3 * math.log(4), -math.log(4)]), **TOL)
    assert count.tolist() == [3, 1]


def test_sequence_log_probs_shift():
    # position t predicts labels[t+1]: logits at t=0 favour token 1 (p = 3/4), at t=1 favour token 0 (p = 3/4);
    # the last position's logits predict nothing and are dropped.
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [ln3, 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    total, count = sequence_log_probs(logits, labels)
    # targets (1, 1): log(3/4) + log(1/4) = ln(3/16) = -1.6739764
    torch.testing.assert_close(total, torch.tensor([math.log(3 / 16)]), **TOL)
    assert count.tolist() == [2]


def test_bf16_logits_give_fp32_log_probs():
    logits = torch.zeros(1, 4, 4, dtype=torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    total, count = sequence_log_probs(logits, labels)
    assert total.dtype == torch.float32
    assert math.isclose(total.item(), -3 * math.log(4), rel_tol=1e-6)  # -3·ln 4 = -4.1588831
    assert count.item() == 3
    per_token = token_log_probs(logits, labels)
    assert per_token.dtype == torch.float32
