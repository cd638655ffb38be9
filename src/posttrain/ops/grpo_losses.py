"""The GRPO family's variants: loss aggregation, clip-higher, sequence-level ratios, batch-scaled
advantages and the soft over-long penalty.

Per-token tensors are (B, T), right-padded; ``mask`` (float or bool, 1 = a token in the loss)
and ``response_mask`` (1 = a response token, whether or not it is in the loss) as in
``posttrain.ops.rl``. The option names follow TRL's ``GRPOConfig`` (``loss_type``,
``epsilon_high``, ``scale_rewards``, ``importance_sampling_level``).

How a loss type meets gradient accumulation. The shared loop divides the sum of the
micro-batches' loss sums by the sum of their ``n_targets`` over all accumulation steps and
processes. A loss type is therefore a pair: ``mean`` gives the micro-batch's loss L_b and
``weight`` gives each sample's count c_i, and the optimised loss is

    L = Σ_b C_b·L_b / Σ_b C_b,   C_b = Σ_{i in b} c_i,

over the micro-batches b of one optimizer step on every process. With the weights below this
is, for ``dapo``, ``grpo`` and ``dr_grpo``, exactly the loss of one big batch (micro-batches
have equal numbers of samples), and for ``bnpo`` the mean of the micro-batches' token means,
as in TRL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.ops.rl import GROUP_STD_EPS, score_groups

# --- importance ratios ------------------------------------------------------------------------


def token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log importance ratio log π_θ(y_t) − log π_old(y_t), 0 where masked (PPO, GRPO).

    logprobs (with grad), old_logprobs, mask: (B, T) -> (B, T)
    """
    return torch.where(mask.bool(), logprobs - old_logprobs, 0.0)  # where: -inf/NaN padding stays out of grads


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log ratio, the same for every token of a sequence. Zheng et al. 2025,
    "Group Sequence Policy Optimization" (the sequence ratio s_i of the GSPO objective):

        log s_i = 1/|y_i| Σ_t (log π_θ(y_i,t) − log π_old(y_i,t)),   s_i = (π_θ(y_i) / π_old(y_i))^(1/|y_i|)

    the log of the geometric mean of the token ratios; clipping s_i clips the whole sequence.
    A row with no real token gets 0. logprobs (with grad), old_logprobs, mask: (B, T) -> (B, T)
    """
    m = mask.bool()
    per_token = token_log_ratio(logprobs, old_logprobs, m)  # (B, T)
    per_sequence = per_token.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return torch.where(m, per_sequence, 0.0)  # (B, T)


IMPORTANCE_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


# --- clipped surrogate ------------------------------------------------------------------------


def clip_higher_token_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate per token with decoupled bounds (DAPO's clip-higher). Yu et al. 2025,
    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", §3.1 (clip-higher); with
    eps_high = eps_low it is Schulman et al. 2017, eq. 7:

        ℓ_t = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high)),   r = exp(log_ratio)

    Returns the per-token loss (not reduced; garbage-free but only meaningful where masked in)
    and where the clipped branch was the active one (a detached bool: no gradient there).
    log_ratio (with grad), advantages, mask: (B, T) -> ((B, T), (B, T) bool)
    """
    advantages = torch.where(mask.bool(), advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


# --- loss aggregation -------------------------------------------------------------------------
# Each ``mean`` takes per_token (B, T), mask (B, T): the tokens in the loss, response_mask (B, T):
# every response token, and the longest completion the sampler allows; it returns L_b (0-dim).


def dapo_mean(per_token, mask, response_mask, max_completion_length: int) -> torch.Tensor:
    """Token-level sum over the micro-batch's response tokens: L_b = Σ_i Σ_t ℓ_it·m_it / Σ_i |o_i|,
    weight |o_i|, so the step's loss is Σ ℓ / (response tokens of the accumulated batch on all
    processes). Yu et al. 2025 (DAPO), §3.3 (token-level loss); TRL ``loss_type="dapo"``, whose normaliser also
    counts the tokens of completions left out by ``mask_truncated_completions``."""
    return torch.where(mask.bool(), per_token, 0.0).sum() / response_mask.sum()


def grpo_mean(per_token, mask, response_mask, max_completion_length: int) -> torch.Tensor:
    """Sequence-level: L_b = 1/B Σ_i (1/|o_i| Σ_t ℓ_it), weight 1. Shao et al. 2024,
    "DeepSeekMath", eq. 3; TRL ``loss_type="grpo"`` (a sequence with no token in the loss adds 0)."""
    m = mask.bool()
    per_sequence = torch.where(m, per_token, 0.0).sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
    return per_sequence.mean()


def bnpo_mean(per_token, mask, response_mask, max_completion_length: int) -> torch.Tensor:
    """Token mean over the micro-batch alone: L_b = Σ_i Σ_t ℓ_it / Σ_i |o_i|, weight 1, so the
    step's loss is the mean of the micro-batches' token means (TRL ``loss_type="bnpo"``)."""
    m = mask.bool()
    return torch.where(m, per_token, 0.0).sum() / m.sum().clamp(min=1)


def dr_grpo_mean(per_token, mask, response_mask, max_completion_length: int) -> torch.Tensor:
    """A constant normaliser: L_b = Σ_i Σ_t ℓ_it / (B·L_max), weight 1, so the step's loss is
    Σ ℓ / (completions in the step x L_max). Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective" (Dr. GRPO), its unbiased objective; TRL ``loss_type="dr_grpo"``."""
    return torch.where(mask.bool(), per_token, 0.0).sum() / (per_token.shape[0] * max_completion_length)


def token_weight(response_mask: torch.Tensor) -> torch.Tensor:
    """Each sample counts its response tokens. (B, T) -> (B,)"""
    return response_mask.sum(-1)


def sequence_weight(response_mask: torch.Tensor) -> torch.Tensor:
    """Each sample counts once. (B, T) -> (B,)"""
    return torch.ones(response_mask.shape[0], dtype=torch.long, device=response_mask.device)


@dataclass(frozen=True)
class LossType:
    mean: Callable[..., torch.Tensor]  # the micro-batch's loss L_b
    weight: Callable[[torch.Tensor], torch.Tensor]  # each sample's count c_i, summed into n_targets


LOSS_TYPES: dict[str, LossType] = {
    "dapo": LossType(dapo_mean, token_weight),
    "grpo": LossType(grpo_mean, sequence_weight),
    "bnpo": LossType(bnpo_mean, sequence_weight),
    "dr_grpo": LossType(dr_grpo_mean, sequence_weight),
}


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1): a masked mean that is 0, not NaN, when no token is in. x, mask: (B, T) -> 0-dim"""
    m = mask.bool()
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


# --- advantages and scores --------------------------------------------------------------------


def batch_scaled_advantages(scores: torch.Tensor, group_size: int, batch_scores: torch.Tensor) -> torch.Tensor:
    """A_i = (s_i − mean(group)) / (std(batch) + 1e-4): the group's mean, the whole batch's std.

    Group-level mean, batch-level std: "Lite PPO" in Liu et al. 2025, "Part I: Tricks or Traps?
    A Deep Dive into RL for LLM Reasoning"; TRL's ``scale_rewards="batch"``. Unlike the group's
    std it does not inflate the advantages of a group whose scores barely differ (the bias Dr.
    GRPO points out). std is unbiased (n−1), as for the group's. scores: (N,) group-major;
    batch_scores: (M,) every score of the batch (all processes), scores among them -> (N,)
    """
    groups = score_groups(scores, group_size)  # (N/k, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    batch_std = batch_scores.to(groups.dtype).std()
    return (centred / (batch_std + GROUP_STD_EPS)).flatten()


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft over-long punishment, scaled by ``penalty`` P. Yu et al. 2025, eq. 13:

        R(y) = 0                                 if |y| ≤ L_max − L_cache
             = P·((L_max − L_cache) − |y|)/L_cache  if L_max − L_cache < |y| ≤ L_max
             = −P                                if |y| > L_max

    with L_max = ``max_length`` (the sampler's limit) and L_cache = ``buffer``; added to the score.
    lengths: (N,) response tokens -> (N,) float, ≤ 0
    """
    start = max_length - buffer
    over = (lengths.float() - start).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)
