"""Token-level losses against values worked out by hand."""

from __future__ import annotations

import math

import torch

from posttrain.ops.losses import IGNORE_INDEX, shifted_correct_sum, shifted_nll_sum


def test_uniform_logits_cost_log_vocab_per_target():
    logits = torch.zeros(1, 4, 4)  # V = 4, every next token has p = 1/4
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])  # 3 targets after the shift
    loss_sum, n = shifted_nll_sum(logits, labels)
    assert n.item() == 3
    assert math.isclose(loss_sum.item(), 3 * math.log(4), rel_tol=1e-6)


def test_shift_and_ignore_index():
    # position 0 predicts labels[1]; logits favour token 1 with p = 3/4 (logits 0 vs ln 3)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [5.0, 5.0]]])
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    loss_sum, n = shifted_nll_sum(logits, labels)
    assert n.item() == 1
    assert math.isclose(loss_sum.item(), math.log(4 / 3), rel_tol=1e-6)  # -log(3/4)
    assert shifted_correct_sum(logits, labels).item() == 1


def test_correct_sum_counts_argmax_hits_on_targets_only():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 0]])  # targets: 0 at t=0 (hit), 0 at t=1 (miss: argmax 1)
    assert shifted_correct_sum(logits, labels).item() == 1


def test_low_precision_logits_are_scored_in_fp32():
    logits = torch.zeros(1, 3, 8, dtype=torch.bfloat16)
    loss_sum, _ = shifted_nll_sum(logits, torch.tensor([[0, 1, 2]]))
    assert loss_sum.dtype == torch.float32
    assert math.isclose(loss_sum.item(), 2 * math.log(8), rel_tol=1e-6)
