"""Per-token and per-sequence log-probabilities, without a full fp32 log-softmax in memory.

log p(y_t) = logit[y_t] - logsumexp(logits): gather the target's logit, subtract a
logsumexp computed over chunks of positions, so the fp32 working set is
(batch, chunk, vocab) however long the sequences and large the vocabulary.

A completion-only loss never reads the logits of prompt positions: ``target_logits`` asks the
model for logits from the first position that predicts a target onwards (Hugging Face's
``logits_to_keep``), so the LM head and the log-softmax skip the prompts.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK = 128  # positions per logsumexp chunk


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """log softmax(logits)[targets] per position, in fp32; ignored targets (-100) give 0.

    logits: (B, T, V), targets: (B, T) -> (B, T)
    """
    safe = targets.clamp(min=0)  # (B, T): -100 -> 0, masked out below
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()  # (B, T)
    norm = torch.cat([torch.logsumexp(part.float(), dim=-1) for part in logits.split(chunk, dim=1)], dim=1)
    return torch.where(targets != IGNORE_INDEX, picked - norm, 0.0)  # where, not *: a masked -inf/NaN stays out


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token log-probs over each sequence's labelled (completion) tokens, and their count.

    logits: (B, T, V), labels: (B, T) with -100 outside the completion -> ((B,), (B,))
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    per_token = token_log_probs(logits[:, :-1], targets)  # (B, T-1)
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def first_target_position(labels: torch.Tensor) -> int:
    """The earliest position t whose logits predict a target in some row: labels[b, t+1] != -100.

    Logits before it are never used by a next-token loss. With no target at all, the last
    position (a window of one, never empty).
    labels: (B, T) -> int in [0, T-1]
    """
    predicts = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)  # (T-1,): position t predicts a target
    if not predicts.any():
        return labels.shape[1] - 1
    return int(predicts.nonzero()[0, 0])


def target_logits(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits from ``first_target_position`` on, and the labels of the same window.

    The shifted losses give the same values on the window as on the whole row, since every target
    lies in it; the LM head (2·hidden·vocab FLOPs a position) runs on K positions instead of T.
    inputs: the model's keyword inputs ((B, T) tensors), labels: (B, T) -> ((B, K, V), (B, K)), K = T - start
    """
    start = first_target_position(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start).logits  # (B, K, V)
    return logits, labels[:, start:]
