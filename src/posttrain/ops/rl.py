"""The maths of on-policy RL for language models: PPO (RLHF), GRPO and RLOO.

Per-token tensors are (B, T), right-padded, with ``mask`` (float or bool, 1 = a real
response token). Masked positions never enter a statistic, and the functions that return
per-token tensors put 0 there, so whatever the padding holds (0, garbage, -inf) stays out.
Notation: π the policy, π_old the policy that sampled the batch, π_ref the frozen reference,
ratio = π/π_old = exp(logp − old_logp), A the advantage, V the value, R the return.

Sources: the papers cited per function, and the reference implementations (OpenAI's
lm-human-preferences and TRL's PPO/RLOO/GRPO trainers), as summarised in Huang et al. 2024,
"The N Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

WHITEN_EPS = 1e-8  # rsqrt(var + eps), as in the reference implementations
GROUP_STD_EPS = 1e-4  # GRPO's (s − mean) / (std + eps), as in TRL


# --- masked statistics -------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σ m over the masked entries: 0-dim with dim=None, else reduced over ``dim``.

    x, mask: (B, T). NaN when no entry is real.
    """
    m = mask.bool()
    total = torch.where(m, x, 0.0)  # where, not *: a masked NaN/inf stays out
    if dim is None:
        return total.sum() / m.sum()
    return total.sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries, 0-dim: mean((x − mean)²), times n/(n−1) if unbiased.

    As TRL's ``masked_var``. Raises ValueError if unbiased and fewer than 2 entries are real.
    """
    centred = x - masked_mean(x, mask)
    var = masked_mean(centred**2, mask)
    if unbiased:
        n = mask.bool().sum()
        if n < 2:
            raise ValueError(f"unbiased variance needs at least 2 real entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)·rsqrt(var + 1e-8), mean and (unbiased) var over the masked entries; 0 where masked.

    shift_mean=False adds the mean back (scale only), as done for rewards. Reference:
    lm-human-preferences ``whiten`` and TRL's ``masked_whiten``. x, mask: (B, T) -> (B, T)
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


# --- KL estimators -------------------------------------------------------------------------
# Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html).
# Each maps per-token log π(y_t) and log π_ref(y_t), (B, T), to a per-token estimate (B, T) of
# KL(π‖π_ref) = E_{y~π}[log π(y) − log π_ref(y)], for tokens sampled from π. No masking here:
# reduce with masked_mean (or mask the rewards) downstream.


def kl_k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref = −log r, r = π_ref/π. Unbiased, high variance, negative for some samples."""
    return logprob - ref_logprob


def kl_k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k2 = ½(log π − log π_ref)² = ½(log r)². Biased (exact only to second order as π_ref → π), low variance, ≥ 0."""
    return 0.5 * (logprob - ref_logprob) ** 2


def kl_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r, r = exp(log π_ref − log π). Unbiased (E_π[r] = 1), lower variance than k1,
    and always ≥ 0 (log r ≤ r − 1). Used as the KL penalty of GRPO (Shao et al. 2024, eq. 4)."""
    log_r = ref_logprob - logprob
    return torch.expm1(log_r) - log_r  # expm1: exact for r near 1, where k3 ≈ ½(log r)²


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


# --- advantages ----------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation. Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eqs. 11-16:

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}           (= Σ_l (γλ)^l δ_{t+l})
        R_t = A_t + V_t                   (the λ-return, the value target)

    The episode ends at each row's last real token: V and A after it are 0, so rows of
    different lengths (right padding) are independent of whatever the padding holds. More
    generally a masked position cuts the recursion, so left padding works too. Advantages
    and returns are 0 where masked. Targets, never differentiated: computed without grad.

    rewards, values, mask: (B, T) -> (advantages, returns), each (B, T)
    """
    m = mask.bool()
    rewards, values = torch.where(m, rewards, 0.0), torch.where(m, values, 0.0)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])  # (B,): V_{t+1}, 0 past the end
    next_adv = values.new_zeros(values.shape[0])  # (B,): A_{t+1}, 0 past the end
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0.0)  # (B,)
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv  # already 0 where masked
    return advantages, torch.where(m, advantages + values, 0.0)


def score_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) group-major scores -> (N / k, k) in a float dtype (bool/int rewards welcome)."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(
            f"scores must be 1-D with a multiple of group_size={group_size} entries, got {tuple(scores.shape)}"
        )
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(dtype).view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO outcome-supervision advantages: A_i = (s_i − mean(group)) / (std(group) + 1e-4).

    Shao et al. 2024, "DeepSeekMath", section 4.1.2 (outcome supervision). std is torch.std's
    default, unbiased (n−1), as in the reference implementations (TRL's GRPOTrainer); a group
    with equal scores gets A = 0. scale=False skips the division ("Dr. GRPO": Liu et al. 2025,
    "Understanding R1-Zero-Like Training: A Critical Perspective").

    scores: (N,), group-major (each prompt's k = group_size samples contiguous) -> (N,).
    Raises ValueError if N is not a multiple of group_size or group_size < 2.
    """
    groups = score_groups(scores, group_size)  # (N/k, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return centred.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = s_i − mean_{j≠i} s_j = s_i − (Σ_j s_j − s_i)/(k − 1).

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
    in LLMs" (RLOO). scores: (N,), group-major -> (N,).
    Raises ValueError if N is not a multiple of group_size or group_size < 2.
    """
    groups = score_groups(scores, group_size)  # (N/k, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).flatten()


# --- PPO losses ----------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate, as a loss. Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7, per token and masked-mean over tokens:

        loss = mean_t max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε)),   ratio = exp(logp − old_logp)

    clipfrac = mean_t [−A·clip(ratio) > −A·ratio] (the clipped branch was taken: no gradient);
    approxkl = ½·mean_t (logp − old_logp)², the k2 estimate of KL(π_old‖π) logged by
    lm-human-preferences and TRL's PPO trainer. clipfrac and approxkl are detached metrics.

    logprobs (with grad), old_logprobs, advantages, mask: (B, T) -> three 0-dim tensors
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)  # (B, T); 0 where masked keeps -inf/NaN out of grads
    advantages = torch.where(m, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), m)
        approxkl = 0.5 * masked_mean(log_ratio**2, m)
    return loss, clipfrac, approxkl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of the PPO reference implementations (OpenAI baselines, lm-human-preferences,
    TRL; Huang et al. 2024, "The N Implementation Details of RLHF with PPO"):

        loss = ½·mean_t max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)

    clipfrac = mean_t [the clipped term is the larger], detached.
    values (with grad), old_values, returns, mask: (B, T) -> two 0-dim tensors
    """
    m = mask.bool()
    values, old_values = torch.where(m, values, 0.0), torch.where(m, old_values, 0.0)
    returns = torch.where(m, returns, 0.0)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), m)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), m)
    return loss, clipfrac


# --- KL coefficient controllers ------------------------------------------------------------


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient β. Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", section 2.2 (lm-human-preferences ``AdaptiveKLController``):

        e = clip(KL_current / KL_target − 1, −0.2, 0.2)
        β ← β·(1 + e·n_steps / horizon)
    """

    value: float  # the current coefficient β
    target: float  # KL_target (nats)
    horizon: int  # in samples: n_steps is the number of samples (episodes) since the last update

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


@dataclass
class FixedKLController:
    """A constant KL coefficient β, with AdaptiveKLController's interface; update does nothing."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


# --- diagnostics ---------------------------------------------------------------------------


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked entries, 0-dim: 1 for perfect values, 0 for a
    constant at the mean return, < 0 for worse. values, returns, mask: (B, T)"""
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits) over the masked tokens, in fp32, 0-dim:

        H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v,   p = softmax(z)

    (the form TRL uses). logits: (B, T, V) finite, mask: (B, T)
    """
    z = logits.float()
    entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # (B, T)
    return masked_mean(entropy, mask)
