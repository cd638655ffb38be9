"""Token-level language-modelling losses, summed (not averaged) so the loop can normalise.

Averaging inside each micro-batch and then averaging the averages weighs a token in a
short micro-batch more than one in a long micro-batch; the loop instead divides the summed
loss by the number of target tokens in the whole global batch (all accumulation steps and
all processes), which makes accumulation and data parallelism exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of target tokens.

    loss = sum_{b, t : labels[b, t+1] != -100} -log softmax(logits[b, t])[labels[b, t+1]]

    logits: (B, T, V), labels: (B, T) with -100 where no loss is taken.
    Returns (loss_sum, n_targets), both 0-dim; computed in fp32 whatever the logits' dtype.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    scores = logits[:, :-1].float()  # (B, T-1, V)
    loss_sum = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def shifted_correct_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of target tokens that are the argmax prediction (for ``mean_token_accuracy``).

    logits: (B, T, V), labels: (B, T). Returns a 0-dim count.
    """
    targets = labels[:, 1:]  # (B, T-1)
    predicted = logits[:, :-1].argmax(dim=-1)  # (B, T-1)
    return ((predicted == targets) & (targets != IGNORE_INDEX)).sum()
