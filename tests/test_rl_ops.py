"""RL maths (posttrain.ops.rl) against plain-loop references, Monte Carlo, and values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.ops.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}


def right_padded(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) float mask, 1 on each row's first lengths[b] positions."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def random_batch(seed: int, lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards, values (fp64, garbage in the padding) and a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    return rewards, values, right_padded(lengths, T)


# --- masked statistics, whitening, explained variance ---------------------------------------


def test_masked_mean_and_var_use_only_real_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, float("nan"), float("inf"), -5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx(2.5)  # (1+2+3+4)/4
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    # entries 1,2,3,4: mean 2.5, Σ(x−mean)² = 5 -> biased 5/4, unbiased 5/3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_whitening_gives_zero_mean_unit_variance_over_real_entries():
    _, x, mask = random_batch(0, [6, 3, 1, 5], T=6)
    x = 3 * x + 7
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[mask == 0] == 0)


def test_whitening_ignores_masked_values():
    _, x, mask = random_batch(1, [6, 3, 1, 5], T=6)
    changed = torch.where(mask.bool(), x, torch.full_like(x, 1e6))  # only padding differs
    for shift_mean in (True, False):
        torch.testing.assert_close(masked_whiten(changed, mask, shift_mean), masked_whiten(x, mask, shift_mean))


def test_whitening_without_shift_keeps_the_mean():
    _, x, mask = random_batch(2, [6, 4, 2], T=6)
    x = x + 5
    w = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_explained_variance_perfect_and_mean_baseline():
    returns, _, mask = random_batch(3, [5, 2, 4], T=5)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    at_mean = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(at_mean, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    garbage = torch.where(mask.bool(), returns, torch.full_like(returns, 1e6))  # padding ignored
    assert explained_variance(garbage, returns, mask).item() == pytest.approx(1.0)


# --- KL estimators ------------------------------------------------------------------------------


def test_kl_estimators_by_formula():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.125, 0.5, 0.0]))
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_k3(logp, ref), (r - 1) - torch.log(r))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp, ref = 10 * torch.randn(10_000, generator=g), 10 * torch.randn(10_000, generator=g)
    logp[:100] = ref[:100]  # r = 1 exactly: k3 = 0
    k3 = kl_k3(logp, ref)
    assert torch.all(k3 >= 0)
    assert torch.all(k3[:100] == 0)


def test_kl_estimators_unbiasedness_by_monte_carlo():
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)  # the policy π (samples come from it)
    q = torch.tensor([0.35, 0.05, 0.1, 0.1, 0.4], dtype=torch.float64)  # the reference π_ref
    exact_kl = (p * (p / q).log()).sum().item()  # KL(p‖q) ≈ 0.5635
    exact_k2 = (p * 0.5 * (p / q).log() ** 2).sum().item()  # E_p[k2] ≈ 0.6288, not KL
    assert abs(exact_k2 - exact_kl) > 0.05

    g = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[samples], q.log()[samples]
    n = samples.numel()

    def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
        return x.mean().item(), (x.std() / math.sqrt(n)).item()

    for estimator in (kl_k1, kl_k3):
        mean, se = mean_and_se(estimator(logp, ref))
        assert abs(mean - exact_kl) < 3 * se, (estimator.__name__, mean, exact_kl, se)
    mean, se = mean_and_se(kl_k2(logp, ref))
    assert abs(mean - exact_k2) < 3 * se
    assert abs(mean - exact_kl) > 50 * se  # biased: far outside the noise (≈ 150 SE)
    # k3 has lower variance than k1 here (π and π_ref are not far apart)
    assert kl_k3(logp, ref).std() < kl_k1(logp, ref).std()


# --- GAE --------------------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """Per row, per t, the explicit sum A_t = Σ_{l=0}^{L-1-t} (γλ)^l δ_{t+l}, with V_L = 0."""
    B, T = rewards.shape
    advantages, returns = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        r, v = rewards[b, :L].tolist(), values[b, :L].tolist() + [0.0]  # the episode ends after token L-1
        deltas = [r[s] + gamma * v[s + 1] - v[s] for s in range(L)]
        for t in range(L):
            advantages[b, t] = sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, L))
            returns[b, t] = advantages[b, t] + v[t]
    return advantages, returns


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7), (0.0, 1.0)])
def test_gae_matches_double_loop_reference(gamma, lam):
    rewards, values, mask = random_batch(4, [7, 1, 4, 0, 6, 3], T=7)  # incl. an empty row
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, ref_adv, **TOL)
    torch.testing.assert_close(returns, ref_ret, **TOL)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = random_batch(5, [5, 2, 4], T=5)
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    rewards_to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask  # Σ_{s≥t} r_s over real tokens
    torch.testing.assert_close(advantages, rewards_to_go - values * mask, **TOL)
    torch.testing.assert_close(returns, rewards_to_go, **TOL)


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.2, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding: its 9 and 7 must not count
    # γ = λ = 1: δ1 = 1 + 0 − 0.2 = 0.8, δ0 = 0 + 0.2 − 0.5 = −0.3, A0 = −0.3 + 0.8 = 0.5; R = A + V = [1, 1]
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 0.0]]))
    # γ = 0.9, λ = 0.95: δ1 = 1 + 0.9·0 − 0.2 = 0.8, δ0 = 0 + 0.9·0.2 − 0.5 = −0.32,
    # A1 = 0.8, A0 = −0.32 + 0.9·0.95·0.8 = −0.32 + 0.684 = 0.364; R = [0.364 + 0.5, 0.8 + 0.2] = [0.864, 1.0]
    advantages, returns = gae(rewards, values, mask, 0.9, 0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.364, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.864, 1.0, 0.0]]))


def test_gae_rows_are_independent_of_padding_contents_and_carry_no_grad():
    rewards, values, mask = random_batch(6, [4, 2, 3], T=4)
    values.requires_grad_(True)
    garbage = torch.where(mask.bool(), rewards, torch.full_like(rewards, float("nan")))
    advantages, returns = gae(garbage, values, mask, 0.99, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    torch.testing.assert_close(advantages, gae(rewards, values, mask, 0.99, 0.95)[0])


# --- PPO losses -------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(7)
    logp, adv = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = right_padded([5, 3, 1], 5)
    loss, clipfrac, approxkl = clipped_policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)
    assert clipfrac.item() == 0.0
    assert approxkl.item() == 0.0


def test_policy_loss_clips_only_where_it_should():
    # two real tokens with ratio 1.5 (ε = 0.2), A = +2 and A = −2; a third, masked one holds garbage
    old = torch.tensor([[-1.0, -1.0, 0.0]])
    logp = (old + torch.tensor([[math.log(1.5), math.log(1.5), 0.0]])).requires_grad_(True)
    logp_with_garbage = torch.where(torch.tensor([[True, True, False]]), logp, float("-inf"))
    adv = torch.tensor([[2.0, -2.0, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac, approxkl = clipped_policy_loss(logp_with_garbage, old, adv, mask, clip_eps=0.2)
    # A = +2: max(−2·1.5, −2·1.2) = max(−3, −2.4) = −2.4 = −1.2·A, clipped
    # A = −2: max(2·1.5, 2·1.2) = max(3, 2.4) = 3 = −A·1.5, not clipped
    assert loss.item() == pytest.approx((-2.4 + 3.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approxkl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    assert not clipfrac.requires_grad and not approxkl.requires_grad
    loss.backward()
    # d/dlogp of the mean: clipped token 0; unclipped −A·ratio/2 = 2·1.5/2 = 1.5; masked token 0, not NaN
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, 0.0]]))


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    values = torch.tensor([[0.5, 0.1, 0.5, 99.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: V = 0.5 clipped to 0.2; max((0.5−1)², (0.2−1)²) = max(0.25, 0.64) = 0.64, clipped branch
    # token 1: V = 0.1 inside the clip range; both terms (0.1−1)² = 0.81, not counted as clipped
    # token 2: V = 0.5 clipped to 0.2, R = 0; max(0.25, 0.04) = 0.25, the unclipped term wins
    # loss = ½·(0.64 + 0.81 + 0.25)/3
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # grads: token 0 clipped -> 0; token 1: (V−R)/3 = −0.3; token 2: (0.5−0)/3; masked 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9 / 3, 0.5 / 3, 0.0]]))


# --- group advantages -------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # group 1: mean 2, unbiased std sqrt(((−1)² + 0 + 1²)/2) = 1 -> [−1, 0, 1]/(1 + 1e-4); group 2: all equal -> 0
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor([1 + 1e-4] * 3 + [1.0] * 3)
    torch.testing.assert_close(grpo_advantages(scores, 3), expected)
    torch.testing.assert_close(grpo_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0]))
    # 0/1 correctness rewards as bool
    out = grpo_advantages(torch.tensor([True, False]), 2, scale=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5]))


def test_rloo_advantages_by_hand():
    # [1, 2, 3]: baselines (2+3)/2, (1+3)/2, (1+2)/2 -> [1 − 2.5, 2 − 2, 3 − 1.5]
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0.0, 1.5]))
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    # = k/(k−1)·(s − mean)
    torch.testing.assert_close(rloo_advantages(scores, 3), 1.5 * grpo_advantages(scores, 3, scale=False))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_advantages_reject_bad_sizes(fn):
    with pytest.raises(ValueError, match="multiple"):
        fn(torch.arange(5.0), 3)
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.arange(4.0), 1)


# --- KL controllers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (7.0, 0.1 * (1 + (7 / 6 - 1) * 256 / 10_000)),  # above target: e = 1/6 -> 0.100426667
        (3.0, 0.1 * (1 - 0.2 * 256 / 10_000)),  # below: e = 3/6 − 1 = −0.5, clipped to −0.2 -> 0.099488
        (60.0, 0.1 * (1 + 0.2 * 256 / 10_000)),  # far above: e = 9, clipped to 0.2 -> 0.100512
        (6.0, 0.1),  # at target: unchanged
    ],
)
def test_adaptive_kl_controller_update(current_kl, expected):
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(torch.tensor(current_kl), n_steps=256)  # a 0-dim tensor is accepted
    assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert isinstance(ctl.value, float)


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(value=0.05)
    for kl in (0.0, 1.0, 100.0):
        ctl.update(kl, n_steps=512)
    assert ctl.value == 0.05


def test_kl_controller_state_round_trip():
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10_000)
    ctl.update(9.0, 64)
    restored = AdaptiveKLController(value=1.0, target=1.0, horizon=1)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored == ctl
    restored.update(9.0, 64)
    ctl.update(9.0, 64)
    assert restored.value == ctl.value

    fixed = FixedKLController(value=0.3)
    other = FixedKLController(value=0.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other == fixed


# --- entropy ----------------------------------------------------------------------------------


def test_entropy_uniform_and_against_log_softmax():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert entropy_from_logits(torch.zeros(2, 3, 8), mask).item() == pytest.approx(math.log(8))
    g = torch.Generator().manual_seed(8)
    logits = 4 * torch.randn(2, 3, 11, generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    per_token = -(logp.exp() * logp).sum(-1)  # (B, T)
    expected = per_token[mask.bool()].mean().item()
    assert entropy_from_logits(logits, mask).item() == pytest.approx(expected, rel=1e-5)
    logits[1, 2] = 1e4  # a masked position changes nothing
    assert entropy_from_logits(logits, mask).item() == pytest.approx(expected, rel=1e-5)
    low = entropy_from_logits(logits.bfloat16(), mask)
    assert low.dtype == torch.float32
