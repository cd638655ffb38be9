"""Preference-optimisation losses: DPO and its family, as pure functions of sequence log-probs.

Every paired loss takes ``PairLogProbs`` (summed completion log-probs of the policy and the
reference for the chosen y+ and rejected y- answers, and their token counts) and
``LossParams``, and returns per-pair losses of shape (B,). They are registered by name in
``PAIRED_LOSSES``; ``kto`` (unpaired data) has its own signature. Notation:

    Δ = (log π(y+) − log π_ref(y+)) − (log π(y−) − log π_ref(y−))
    avg log π(y) = log π(y) / |y|      (length-normalised, |y| = completion tokens)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogProbs:
    """Summed completion log-probs, each (B,); the reference ones are None for reference-free losses."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1  # inverse temperature of the implicit reward (ORPO: weight of the odds-ratio term)
    epsilon: float = 0.0  # label smoothing (cdpo) / label-noise rate (robust)
    gamma: float = 0.5  # SimPO's target reward margin


def chosen_logratio(lp: PairLogProbs) -> torch.Tensor:
    return lp.chosen - lp.ref_chosen


def rejected_logratio(lp: PairLogProbs) -> torch.Tensor:
    return lp.rejected - lp.ref_rejected


def delta(lp: PairLogProbs) -> torch.Tensor:
    """Δ: how much more the policy prefers y+ over y− than the reference does. (B,)"""
    return chosen_logratio(lp) - rejected_logratio(lp)


def sigmoid_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """DPO: −log σ(βΔ). Rafailov et al. 2023, "Direct Preference Optimization", eq. 7."""
    return -F.logsigmoid(p.beta * delta(lp))


def cdpo_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """Conservative DPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); labels flipped with probability ε.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO".
    """
    z = p.beta * delta(lp)
    return -(1 - p.epsilon) * F.logsigmoid(z) - p.epsilon * F.logsigmoid(-z)


def robust_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """rDPO: [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1−2ε), unbiased under label-noise rate ε < 0.5.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", eq. 8.
    """
    z = p.beta * delta(lp)
    return (-(1 - p.epsilon) * F.logsigmoid(z) + p.epsilon * F.logsigmoid(-z)) / (1 - 2 * p.epsilon)


def ipo_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """IPO: (Δ_avg − 1/(2β))². Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", eq. 17, which uses summed log-ratios; like TRL we average
    each log-ratio over its answer's tokens, so the target margin does not depend on length."""
    avg = (lp.chosen - lp.ref_chosen) / lp.chosen_tokens - (lp.rejected - lp.ref_rejected) / lp.rejected_tokens
    return (avg - 1 / (2 * p.beta)) ** 2


def hinge_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """SLiC hinge: max(0, 1 − βΔ). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback"; with the reference as in Liu et al. 2024 (RSO)."""
    return F.relu(1 - p.beta * delta(lp))


def simpo_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """SimPO: −log σ(β·(avg log π(y+) − avg log π(y−)) − γ), reference-free.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6.
    """
    margin = lp.chosen / lp.chosen_tokens - lp.rejected / lp.rejected_tokens
    return -F.logsigmoid(p.beta * margin - p.gamma)


def orpo_loss(lp: PairLogProbs, p: LossParams) -> torch.Tensor:
    """ORPO: NLL(y+) − β·log σ(log odds(y+) − log odds(y−)), odds(y) = P/(1−P), P = exp(avg log π(y)).

    Reference-free; β is ORPO's λ. Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model", eqs. 4-7.
    """
    avg_chosen, avg_rejected = lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens

    def log_odds(avg: torch.Tensor) -> torch.Tensor:  # log P - log(1 - P), with expm1 for P near 1
        return avg - torch.log(-torch.expm1(avg))

    return -avg_chosen - p.beta * F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))


def rpo_nll(lp: PairLogProbs) -> torch.Tensor:
    """RPO's extra term: the chosen answer's NLL per token, added with weight α to any loss.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1.
    """
    return -lp.chosen / lp.chosen_tokens


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO for unpaired data, per example (B,). Ethayarajh et al. 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization", eq. 8:

        r = log π(y|x) − log π_ref(y|x),   z₀ = max(0, mean over the batch of r)  (no gradient)
        desirable:   λ_D·(1 − σ(β(r − z₀)))
        undesirable: λ_U·(1 − σ(β(z₀ − r)))

    z₀ estimates KL(π‖π_ref) from the batch's own completions (the paper uses mismatched
    prompt/completion pairs of the batch; this in-batch estimate needs no extra forward).
    logps, ref_logps: (B,), desirable: (B,) bool.
    """
    ratio = logps - ref_logps
    z0 = ratio.detach().mean().clamp(min=0)
    gain = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, gain, loss)


PairedLoss = Callable[[PairLogProbs, LossParams], torch.Tensor]
PAIRED_LOSSES: dict[str, PairedLoss] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
UNPAIRED_LOSSES = ("kto",)
REFERENCE_FREE = frozenset({"simpo", "orpo"})


@torch.no_grad()
def pair_metric_sums(lp: PairLogProbs, beta: float) -> dict[str, torch.Tensor]:
    """TRL-named metrics, summed over the batch's pairs (the loop divides by the number of pairs).

    rewards: the implicit reward β·(log π − log π_ref), or β·avg log π for reference-free losses;
    kl/chosen, kl/rejected: the mean log-ratio to the reference, log π − log π_ref.
    """
    if lp.ref_chosen is None:
        chosen, rejected = beta * lp.chosen / lp.chosen_tokens, beta * lp.rejected / lp.rejected_tokens
    else:
        chosen, rejected = beta * chosen_logratio(lp), beta * rejected_logratio(lp)
    sums = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": lp.chosen.sum(),
        "logps/rejected": lp.rejected.sum(),
    }
    if lp.ref_chosen is not None:
        sums |= {"kl/chosen": chosen_logratio(lp).sum(), "kl/rejected": rejected_logratio(lp).sum()}
    return sums
