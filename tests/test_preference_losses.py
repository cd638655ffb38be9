"""DPO-family losses (posttrain.ops.preference) against values worked out by hand.

Shorthand in the comments: σ(x) = 1/(1+e^-x), -log σ(x) = ln(1 + e^-x), Δ as in the module docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.ops.preference import (
    PAIRED_LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogProbs,
    cdpo_loss,
    delta,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_loss,
    rpo_nll,
    sigmoid_loss,
    simpo_loss,
)

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}

LN2 = 0.6931471806  # ln 2
SP1 = 0.3132616875  # ln(1 + e^-1) = -log σ(1)
SPM1 = 1.3132616875  # ln(1 + e) = -log σ(-1) = 1 + ln(1 + e^-1)
ONE_MINUS_SIG1 = 0.2689414214  # 1 - σ(1) = σ(-1) = 1/(1 + e)
SIG1 = 0.7310585786  # σ(1) = e/(1 + e)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def pair(
    chosen,
    rejected,
    ref_chosen=None,
    ref_rejected=None,
    chosen_tokens=1,
    rejected_tokens=1,
) -> PairLogProbs:
    """A batch of pairs from plain numbers or lists; token counts broadcast from scalars."""

    def vec(x):
        return None if x is None else torch.as_tensor(x, dtype=F64).reshape(-1)

    c, r = vec(chosen), vec(rejected)
    return PairLogProbs(
        chosen=c,
        rejected=r,
        chosen_tokens=vec(chosen_tokens).expand_as(c).clone(),
        rejected_tokens=vec(rejected_tokens).expand_as(r).clone(),
        ref_chosen=vec(ref_chosen),
        ref_rejected=vec(ref_rejected),
    )


def pair_with_delta(d: float) -> PairLogProbs:
    """Δ = d: chosen log-ratio d, rejected log-ratio 0, with non-trivial reference log-probs."""
    return pair(chosen=-5.0 + d, rejected=-7.0, ref_chosen=-5.0, ref_rejected=-7.0)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype).reshape(actual.shape), **TOL)


# --- Δ ---------------------------------------------------------------------------------------------------------------


def test_delta_is_difference_of_log_ratios():
    lp = pair(chosen=-3.0, rejected=-10.0, ref_chosen=-4.0, ref_rejected=-8.0)
    close(delta(lp), [3.0])  # (-3 - -4) - (-10 - -8) = 1 - (-2) = 3


# --- sigmoid (DPO) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.5])
def test_sigmoid_policy_equal_to_reference_is_ln2(beta):
    lp = pair(chosen=[-3.0, -12.5], rejected=[-9.0, -1.0], ref_chosen=[-3.0, -12.5], ref_rejected=[-9.0, -1.0])
    close(sigmoid_loss(lp, LossParams(beta=beta)), [LN2, LN2])  # Δ = 0: -log σ(0) = ln 2


def test_sigmoid_beta_delta_one():
    # β = 0.5, Δ = 2 -> βΔ = 1: -log σ(1) = ln(1 + e^-1) = 0.3132617
    close(sigmoid_loss(pair_with_delta(2.0), LossParams(beta=0.5)), [SP1])
    # β = 0.5, Δ = -2 -> βΔ = -1: ln(1 + e) = 1.3132617
    close(sigmoid_loss(pair_with_delta(-2.0), LossParams(beta=0.5)), [SPM1])


def test_sigmoid_raising_chosen_logp_lowers_loss():
    chosen = t(-3.0).requires_grad_()
    lp = PairLogProbs(chosen, t(-7.0), t(1.0), t(1.0), ref_chosen=t(-5.0), ref_rejected=t(-7.0))  # Δ = 2
    sigmoid_loss(lp, LossParams(beta=0.5)).sum().backward()
    # d/d chosen of -log σ(βΔ) = -β·(1 - σ(βΔ)) = -0.5·(1 - σ(1)) = -0.5·0.2689414 = -0.1344707
    close(chosen.grad, [-0.5 * ONE_MINUS_SIG1])
    assert chosen.grad.item() < 0
    lower = sigmoid_loss(pair_with_delta(2.5), LossParams(beta=0.5))  # chosen logp + 0.5
    higher = sigmoid_loss(pair_with_delta(2.0), LossParams(beta=0.5))
    assert lower.item() < higher.item()


# --- cdpo ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [-3.0, 0.0, 0.7, 4.0])
def test_cdpo_with_zero_epsilon_is_sigmoid(d):
    p = LossParams(beta=0.3, epsilon=0.0)
    close(cdpo_loss(pair_with_delta(d), p), [math.log1p(math.exp(-0.3 * d))])  # -log σ(0.3·Δ)
    close(cdpo_loss(pair_with_delta(d), p), sigmoid_loss(pair_with_delta(d), p))


def test_cdpo_label_smoothing():
    # ε = 0.1, βΔ = 1: 0.9·ln(1 + e^-1) + 0.1·ln(1 + e) = 0.9·0.3132617 + 0.1·1.3132617
    #                                                   = 0.2819355 + 0.1313262 = 0.4132617
    close(cdpo_loss(pair_with_delta(2.0), LossParams(beta=0.5, epsilon=0.1)), [0.4132617])


# --- robust (rDPO) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [-3.0, 0.0, 0.7, 4.0])
def test_robust_with_zero_epsilon_is_sigmoid(d):
    p = LossParams(beta=0.3, epsilon=0.0)
    close(robust_loss(pair_with_delta(d), p), [math.log1p(math.exp(-0.3 * d))])  # -log σ(0.3·Δ)


def test_robust_value():
    # ε = 0.1, βΔ = 1: (0.9·ln(1 + e^-1) - 0.1·ln(1 + e)) / (1 - 0.2)
    #               = (0.2819355 - 0.1313262) / 0.8 = 0.1506094 / 0.8 = 0.1882617
    close(robust_loss(pair_with_delta(2.0), LossParams(beta=0.5, epsilon=0.1)), [0.1882617])


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3, 0.45])
@pytest.mark.parametrize("d", [-2.0, 0.5, 3.0])
def test_robust_is_unbiased_under_label_flips(eps, d):
    # Observed label flipped with prob. ε: E = (1-ε)·robust(Δ) + ε·robust(-Δ).
    # With A = -log σ(βΔ), B = -log σ(-βΔ): robust(Δ) = ((1-ε)A - εB)/(1-2ε), robust(-Δ) = ((1-ε)B - εA)/(1-2ε),
    # E = ((1-ε)² - ε²)·A / (1-2ε) + (-(1-ε)ε + ε(1-ε))·B / (1-2ε) = A.
    p = LossParams(beta=0.5, epsilon=eps)
    clean = math.log1p(math.exp(-0.5 * d))  # A = -log σ(βΔ)
    expected_over_flips = (1 - eps) * robust_loss(pair_with_delta(d), p) + eps * robust_loss(pair_with_delta(-d), p)
    close(expected_over_flips, [clean])
    # the same with the flip done by swapping y+ and y- instead of negating Δ by hand
    lp = pair(chosen=-1.0 + d, rejected=-4.0, ref_chosen=-1.0, ref_rejected=-4.0)
    swapped = pair(chosen=-4.0, rejected=-1.0 + d, ref_chosen=-4.0, ref_rejected=-1.0)
    close((1 - eps) * robust_loss(lp, p) + eps * robust_loss(swapped, p), [clean])


# --- ipo -------------------------------------------------------------------------------------------------------------


def test_ipo_is_length_averaged():
    # chosen log-ratio 6 over 2 tokens -> 3; rejected log-ratio 0 over 3 tokens -> 0; Δ_avg = 3
    # β = 0.1: 1/(2β) = 5; (3 - 5)² = 4   (the unaveraged Δ = 6 would give (6 - 5)² = 1)
    lp = pair(chosen=-4.0, rejected=-9.0, ref_chosen=-10.0, ref_rejected=-9.0, chosen_tokens=2, rejected_tokens=3)
    close(ipo_loss(lp, LossParams(beta=0.1)), [4.0])


def test_ipo_rejected_side_is_averaged_too():
    # chosen log-ratio 0; rejected log-ratio -6 over 3 tokens -> -2; Δ_avg = 0 - (-2) = 2
    # β = 0.25: 1/(2β) = 2; (2 - 2)² = 0   (unaveraged Δ = 6: (6 - 2)² = 16)
    lp = pair(chosen=-5.0, rejected=-10.0, ref_chosen=-5.0, ref_rejected=-4.0, chosen_tokens=4, rejected_tokens=3)
    close(ipo_loss(lp, LossParams(beta=0.25)), [0.0])


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.5, 2.0])
def test_ipo_is_zero_at_target_margin(beta):
    target = 1 / (2 * beta)  # Δ_avg = 1/(2β) -> (1/(2β) - 1/(2β))² = 0
    lp = pair(chosen=-1.0 + 2 * target, rejected=-3.0, ref_chosen=-1.0, ref_rejected=-3.0, chosen_tokens=2)
    loss = ipo_loss(lp, LossParams(beta=beta))
    close(loss, [0.0])
    # and it grows on both sides: Δ_avg = 1/(2β) ± 1 -> (±1)² = 1
    for shift in (-1.0, 1.0):
        lp = pair(
            chosen=-1.0 + 2 * (target + shift), rejected=-3.0, ref_chosen=-1.0, ref_rejected=-3.0, chosen_tokens=2
        )
        close(ipo_loss(lp, LossParams(beta=beta)), [1.0])


# --- hinge -----------------------------------------------------------------------------------------------------------


def test_hinge():
    p = LossParams(beta=0.5)
    close(hinge_loss(pair_with_delta(1.0), p), [0.5])  # βΔ = 0.5: max(0, 1 - 0.5) = 0.5
    close(hinge_loss(pair_with_delta(4.0), p), [0.0])  # βΔ = 2: max(0, 1 - 2) = 0
    close(hinge_loss(pair_with_delta(2.0), p), [0.0])  # βΔ = 1: max(0, 0) = 0
    close(hinge_loss(pair_with_delta(-2.0), p), [2.0])  # βΔ = -1: max(0, 1 + 1) = 2


# --- simpo -----------------------------------------------------------------------------------------------------------


def test_simpo_reference_free():
    # avg chosen = -3/3 = -1, avg rejected = -8/4 = -2; β = 2, γ = 0.5:
    # -log σ(2·(-1 - -2) - 0.5) = -log σ(1.5) = ln(1 + e^-1.5) = ln(1.2231302) = 0.2014133
    lp = pair(chosen=-3.0, rejected=-8.0, chosen_tokens=3, rejected_tokens=4)
    assert lp.ref_chosen is None and lp.ref_rejected is None
    close(simpo_loss(lp, LossParams(beta=2.0, gamma=0.5)), [0.2014133])


def test_simpo_margin_gamma():
    # equal averages (-2/1 and -4/2): -log σ(β·0 - γ) = -log σ(-1) = ln(1 + e) = 1.3132617 for γ = 1
    lp = pair(chosen=-2.0, rejected=-4.0, chosen_tokens=1, rejected_tokens=2)
    close(simpo_loss(lp, LossParams(beta=2.0, gamma=1.0)), [SPM1])


# --- orpo ------------------------------------------------------------------------------------------------------------


def test_orpo():
    # avg chosen = 2·ln 0.5 / 2 = ln 0.5 -> P = 0.5, odds = 0.5/0.5 = 1, log odds = 0
    # avg rejected = 3·ln 0.25 / 3 = ln 0.25 -> P = 0.25, odds = 0.25/0.75 = 1/3, log odds = -ln 3
    # NLL = -ln 0.5 = ln 2 = 0.6931472; OR term = -log σ(0 + ln 3) = ln(1 + 1/3) = ln(4/3) = 0.2876821
    # β = 0.1: 0.6931472 + 0.1·0.2876821 = 0.7219154
    lp = pair(chosen=2 * math.log(0.5), rejected=3 * math.log(0.25), chosen_tokens=2, rejected_tokens=3)
    close(orpo_loss(lp, LossParams(beta=0.1)), [0.7219154])


def test_orpo_beta_zero_is_chosen_nll():
    # β = 0: only the per-token NLL of y+: -(-6/3) = 2
    lp = pair(chosen=-6.0, rejected=-1.0, chosen_tokens=3, rejected_tokens=2)
    close(orpo_loss(lp, LossParams(beta=0.0)), [2.0])


# --- rpo_nll ---------------------------------------------------------------------------------------------------------


def test_rpo_nll_is_per_token_chosen_nll():
    lp = pair(chosen=[-6.0, -1.5], rejected=[-1.0, -1.0], chosen_tokens=[3, 2], rejected_tokens=[5, 5])
    close(rpo_nll(lp), [2.0, 0.75])  # -(-6)/3 = 2, -(-1.5)/2 = 0.75


# --- kto -------------------------------------------------------------------------------------------------------------


def kto(r, desirable, beta=1.0, **weights):
    ref = t(*[-10.0] * len(r))
    return kto_loss(ref + t(*r), ref, torch.tensor(desirable), beta, **weights)


def test_kto_zero_reference_point():
    # r = [1, -1]: mean 0 -> z₀ = max(0, 0) = 0
    # desirable r = 1:    1 - σ(1·(1 - 0)) = 1 - σ(1) = 0.2689414
    # undesirable r = -1: 1 - σ(1·(0 - -1)) = 1 - σ(1) = 0.2689414
    close(kto([1.0, -1.0], [True, False]), [ONE_MINUS_SIG1, ONE_MINUS_SIG1])


def test_kto_positive_reference_point():
    # r = [2, 1, 3], all desirable: z₀ = max(0, 6/3) = 2
    # 1 - σ(2 - 2) = 0.5;  1 - σ(1 - 2) = σ(1) = 0.7310586;  1 - σ(3 - 2) = 1 - σ(1) = 0.2689414
    close(kto([2.0, 1.0, 3.0], [True, True, True]), [0.5, SIG1, ONE_MINUS_SIG1])
    # r = [3, 1, 2], labels [D, U, U]: z₀ = 2
    # D r=3: 1 - σ(3 - 2) = 0.2689414;  U r=1: 1 - σ(2 - 1) = 0.2689414;  U r=2: 1 - σ(2 - 2) = 0.5
    close(kto([3.0, 1.0, 2.0], [True, False, False]), [ONE_MINUS_SIG1, ONE_MINUS_SIG1, 0.5])


def test_kto_reference_point_clamped_at_zero():
    # r = [-1, -3]: mean -2 -> z₀ = max(0, -2) = 0
    # D r=-1: 1 - σ(-1) = σ(1) = 0.7310586;  U r=-3: 1 - σ(0 - -3) = 1 - σ(3) = 1/(1 + e^3) = 0.0474259
    close(kto([-1.0, -3.0], [True, False]), [SIG1, 0.0474259])


def test_kto_beta_scales_the_reward():
    # r = [2, -2], z₀ = 0, β = 0.5: D 1 - σ(0.5·2) = 0.2689414;  U 1 - σ(0.5·(0 + 2)) = 0.2689414
    close(kto([2.0, -2.0], [True, False], beta=0.5), [ONE_MINUS_SIG1, ONE_MINUS_SIG1])


def test_kto_weights_scale_each_side():
    # as in test_kto_zero_reference_point, times λ_D = 2 and λ_U = 0.5
    losses = kto([1.0, -1.0], [True, False], desirable_weight=2.0, undesirable_weight=0.5)
    close(losses, [2 * ONE_MINUS_SIG1, 0.5 * ONE_MINUS_SIG1])  # 0.5378828, 0.1344707


def test_kto_reference_point_carries_no_gradient():
    # r = [2, 1, 3], labels [D, D, U], β = 0.5, λ_D = 1, λ_U = 2; z₀ = 2 held constant.
    # d/dr [λ_D(1 - σ(β(r - z₀)))] = -λ_D·β·σ'(β(r - z₀)),  d/dr [λ_U(1 - σ(β(z₀ - r)))] = +λ_U·β·σ'(β(z₀ - r)),
    # σ'(x) = σ(x)(1 - σ(x)), even in x: σ'(0) = 0.25, σ'(±0.5) = 0.6224593·0.3775407 = 0.2350037
    # r=2 (D): -1·0.5·σ'(0) = -0.125;  r=1 (D): -1·0.5·σ'(-0.5) = -0.1175019;  r=3 (U): 2·0.5·σ'(-0.5) = 0.2350037
    # (differentiating z₀ = mean r would add (1/3)·Σ_j ∂loss_j/∂z₀ = (0.125 + 0.1175019 - 0.2350037)/3 = 0.0024994
    #  to every entry of the gradient of the sum, and make the Jacobian non-diagonal)
    ref = t(-4.0, -6.0, -5.0)
    desirable = torch.tensor([True, True, False])
    expected = [-0.125, -0.1175019, 0.2350037]

    logps = (ref + t(2.0, 1.0, 3.0)).requires_grad_()
    kto_loss(logps, ref, desirable, 0.5, desirable_weight=1.0, undesirable_weight=2.0).sum().backward()
    close(logps.grad, expected)

    jac = torch.autograd.functional.jacobian(
        lambda lp: kto_loss(lp, ref, desirable, 0.5, desirable_weight=1.0, undesirable_weight=2.0),
        ref + t(2.0, 1.0, 3.0),
    )
    close(jac, torch.diag(t(*expected)))  # each loss depends only on its own log-prob


# --- registry --------------------------------------------------------------------------------------------------------


def test_registry_holds_exactly_the_paired_losses():
    assert set(PAIRED_LOSSES) == {"sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"}
    assert set(REFERENCE_FREE) == {"simpo", "orpo"}


@pytest.mark.parametrize("name", sorted(PAIRED_LOSSES))
def test_every_paired_loss_is_per_pair_and_finite(name):
    g = torch.Generator().manual_seed(0)
    tokens_c, tokens_r = t(3.0, 7.0, 1.0), t(5.0, 2.0, 4.0)
    # summed log-probs: negative, per-token averages between -3 and -0.05
    chosen = -tokens_c * (0.05 + 2.95 * torch.rand(3, generator=g, dtype=F64))
    rejected = -tokens_r * (0.05 + 2.95 * torch.rand(3, generator=g, dtype=F64))
    refs = {} if name in REFERENCE_FREE else {"ref_chosen": chosen - 0.3, "ref_rejected": rejected + 0.2}
    lp = PairLogProbs(chosen, rejected, tokens_c, tokens_r, **refs)
    losses = PAIRED_LOSSES[name](lp, LossParams(beta=0.1, epsilon=0.1, gamma=0.5))
    assert losses.shape == (3,)
    assert torch.isfinite(losses).all()
