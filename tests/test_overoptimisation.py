"""Gao et al.'s functional forms (fits, peaks) and the over-optimisation onset detector."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from posttrain.ops.overoptimisation import (
    Fit,
    Onset,
    OnsetDetector,
    effective_z,
    find_onset,
    fit_curve,
    peak,
    predict,
    sem,
)

# --- fits -----------------------------------------------------------------------------------


def test_peak_by_hand():
    # rl, α = 2, β = 1: d* = exp(2/1 − 1) = e, R(e) = e·(2 − ln e) = e
    assert peak(2.0, 1.0, "rl") == pytest.approx(math.e)
    # bon, α = 2, β = 0.5: d* = 2/(2·0.5) = 2, R(2) = 2·(2 − 0.5·2) = 2
    assert peak(2.0, 0.5, "bon") == pytest.approx(2.0)
    assert peak(2.0, 0.0, "rl") is None  # β ≤ 0: no maximum
    assert peak(2.0, -1.0, "bon") is None
    assert peak(-1.0, 0.5, "bon") is None  # α ≤ 0: the maximum is at d ≤ 0


@pytest.mark.parametrize(
    ("form", "peak_d", "peak_gold"),
    [("rl", math.e, 0.5 + math.e), ("bon", 2.0, 0.5 + 2.0)],
)
def test_exact_curve_is_recovered_with_its_peak(form, peak_d, peak_gold):
    alpha, beta = (2.0, 1.0) if form == "rl" else (2.0, 0.5)
    d = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    truth = Fit(form, alpha, beta, 0.5, None, None, 1.0, 0)
    fit = fit_curve(d, predict(truth, d), form)
    assert (fit.alpha, fit.beta, fit.start) == pytest.approx((alpha, beta, 0.5), abs=1e-10)
    assert fit.peak_d == pytest.approx(peak_d)
    assert fit.peak_gold == pytest.approx(peak_gold)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.n_points == 5
    assert json.loads(json.dumps(fit.as_dict()))["form"] == form


def test_predict_by_hand():
    fit = Fit("rl", 2.0, 1.0, 0.5, None, None, 1.0, 3)
    # d = 0: d·ln d := 0, so the start; d = 1: 0.5 + 1·(2 − 0) = 2.5; d = e: 0.5 + e·(2 − 1)
    np.testing.assert_allclose(predict(fit, [0.0, 1.0, math.e]), [0.5, 2.5, 0.5 + math.e])
    bon = Fit("bon", 2.0, 0.5, 0.5, None, None, 1.0, 3)
    np.testing.assert_allclose(predict(bon, [0.0, 1.0, 4.0]), [0.5, 2.0, 0.5])  # 0.5 + 4·(2 − 2)


@pytest.mark.parametrize("form", ["rl", "bon"])
@pytest.mark.parametrize("seed", range(10))
def test_noisy_fit_recovers_alpha_and_beta_within_5_percent(form, seed):
    alpha, beta = (1.0, 0.5) if form == "rl" else (1.0, 0.2)
    d = np.linspace(0, 6, 100)
    gold = predict(Fit(form, alpha, beta, 0.2, None, None, 1.0, 0), d)
    gold = gold + np.random.default_rng(seed).normal(0, 0.05, len(d))
    fit = fit_curve(d, gold, form)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    assert fit.beta == pytest.approx(beta, rel=0.05)
    assert fit.peak_d == pytest.approx(peak(alpha, beta, form), rel=0.1)


def test_rising_curve_has_no_peak():
    d = np.linspace(0, 3, 20)
    fit = fit_curve(d, 1 + 0.5 * d**2, "bon")  # β = −0.5
    assert fit.beta == pytest.approx(-0.5)
    assert fit.peak_d is None and fit.peak_gold is None


def test_fit_refuses_what_cannot_define_it():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_curve([0, 1], [0, 1], "rl")
    with pytest.raises(ValueError, match="3 distinct values"):
        fit_curve([1, 1, 1, 1], [0, 1, 2, 3], "rl")
    with pytest.raises(ValueError, match="3 distinct values"):
        fit_curve([0, 1, 0, 1], [0, 1, 2, 3], "bon")
    with pytest.raises(ValueError, match="non-negative"):
        fit_curve([-1, 1, 2], [0, 1, 2], "rl")
    with pytest.raises(ValueError, match="form"):
        fit_curve([0, 1, 2], [0, 1, 2], "ppo")
    with pytest.raises(ValueError, match="finite"):
        fit_curve([0, 1, 2], [0, float("nan"), 2], "rl")


# --- the detector ---------------------------------------------------------------------------


def test_sem_by_hand():
    assert sem(2.0, 4) == 1.0
    assert sem(0.5, 1) == 0.5
    with pytest.raises(ValueError):
        sem(1.0, 0)


def test_effective_z_by_hand():
    assert effective_z(3.0, 5, 5) == 3.0  # one independent window: no widening
    assert effective_z(3.0, 2, 5) == 3.0
    assert effective_z(3.0, 50, 5) == pytest.approx(math.sqrt(9 + 2 * math.log(10)))


def test_detector_by_hand():
    # window 2, z 1, patience 1, no noise; smoothed gold 0.5 (best), 1.0 (best, step 3), 0.5: a drop of 0.5
    detector = OnsetDetector(window=2, z=1.0, patience=1)
    results = [detector.update(s, g, 0.0, p) for s, g, p in zip(range(1, 6), [0, 1, 1, 0, 0], range(5), strict=True)]
    assert results[:3] == [None, None, None]
    assert results[3] == Onset(step=4, peak_step=3, best_gold=1.0, gold=0.5, drop=0.5, noise=0.0,
                               proxy_at_peak=1.5, proxy=2.5)  # fmt: skip
    assert results[4] is None  # only once
    assert detector.best_step == 3 and detector.best_smoothed == 1.0
    assert detector.onset == results[3]


def test_noise_holds_back_a_small_drop():
    # smoothed gold 0.5, 1.0 (best), 0.75, 0.5: drops of 0.25 and 0.5. Without noise the first fires; with a
    # standard error of 0.3 per iteration each window's is √(2·0.3²)/2 and the combined one 0.3, so the
    # threshold is at least z·0.3 = 0.6
    gold = [0, 1, 1, 0.5, 0.5]
    assert find_onset(range(1, 6), gold, [0.0] * 5, range(5), window=2, z=2.0, patience=1).step == 4
    assert find_onset(range(1, 6), gold, [0.3] * 5, range(5), window=2, z=2.0, patience=1) is None


def test_improved_marks_each_new_best():
    detector = OnsetDetector(window=2, z=3.0, patience=2)
    flags = []
    for step, gold in enumerate([0.0, 1.0, 0.5, 2.0, 0.0], start=1):
        detector.update(step, gold, 0.1, float(step))
        flags.append(detector.improved)
    # smoothed: –, 0.5 (first), 0.75 (best), 1.25 (best), 1.0
    assert flags == [False, True, True, True, False]
    assert detector.best_step == 4


def tent(steps: int, peak_at: int, slope: float) -> np.ndarray:
    """Gold rising by ``slope`` per iteration up to ``peak_at``, then falling as fast."""
    t = np.arange(1, steps + 1)
    return slope * np.minimum(t, 2 * peak_at - t)


def test_finds_a_planted_peak_within_a_few_iterations():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        gold = tent(100, 40, 0.05) + rng.normal(0, 0.05, 100)
        proxy = np.linspace(0, 5, 100)
        onset = find_onset(range(1, 101), gold, [0.05] * 100, proxy)
        assert onset is not None, seed
        assert 40 < onset.step <= 52, (seed, onset)
        assert abs(onset.peak_step - 40) <= 6, (seed, onset)
        assert onset.proxy > onset.proxy_at_peak and onset.drop > onset.noise


def test_does_not_fire_on_a_rising_curve():
    t = np.arange(1, 151)
    for seed in range(200):
        gold = 0.5 * np.sqrt(t / 150) + np.random.default_rng(seed).normal(0, 0.1, 150)  # rises, ever more slowly
        assert find_onset(t, gold, [0.1] * 150, t * 0.1) is None, seed


def test_does_not_fire_while_the_proxy_falls_too():
    gold = tent(100, 40, 0.05)
    assert find_onset(range(1, 101), gold, [0.01] * 100, -np.arange(100.0)) is None
    assert find_onset(range(1, 101), gold, [0.01] * 100, np.arange(100.0)) is not None


def test_a_threshold_without_noise_fires_on_flat_curves():
    fired = 0
    for seed in range(100):
        gold = np.random.default_rng(seed).normal(0, 0.1, 100)
        fired += find_onset(range(1, 101), gold, [1e-12] * 100, np.arange(100.0)) is not None
        assert find_onset(range(1, 101), gold, [0.1] * 100, np.arange(100.0)) is None, seed
    assert fired >= 95


def test_state_dict_round_trip_gives_identical_decisions():
    rng = np.random.default_rng(0)
    gold, sems, proxy = tent(120, 50, 0.03) + rng.normal(0, 0.05, 120), rng.uniform(0.03, 0.07, 120), np.arange(120.0)
    straight, resumed = OnsetDetector(), OnsetDetector()
    for cut in (0, 3, 30, 60):  # before any window, inside the first, near the peak, after the onset
        straight, resumed = OnsetDetector(), OnsetDetector()
        decisions = {"straight": [], "resumed": []}
        for i in range(120):
            if i == cut:
                resumed = OnsetDetector()
                resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
            for name, detector in (("straight", straight), ("resumed", resumed)):
                out = detector.update(i + 1, gold[i], sems[i], proxy[i])
                decisions[name].append((out, detector.improved, detector.best_step, detector.best_smoothed))
        assert decisions["straight"][cut:] == decisions["resumed"][cut:]
        assert straight.onset is not None and straight.onset == resumed.onset
        assert straight.state_dict() == resumed.state_dict()


def test_state_from_other_settings_is_refused():
    state = OnsetDetector(window=5).state_dict()
    with pytest.raises(ValueError, match="window"):
        OnsetDetector(window=3).load_state_dict(state)


def test_replay_equals_online():
    rng = np.random.default_rng(3)
    steps = list(range(2, 242, 2))  # gold scored every other iteration
    gold, sems, proxy = tent(120, 45, 0.03) + rng.normal(0, 0.05, 120), [0.05] * 120, np.arange(120.0)
    detector, returned = OnsetDetector(window=4, z=2.5, patience=3), []
    for point in zip(steps, gold, sems, proxy, strict=True):
        onset = detector.update(*point)
        if onset is not None:
            returned.append(onset)
    assert len(returned) == 1
    assert find_onset(steps, gold, sems, proxy, window=4, z=2.5, patience=3) == returned[0] == detector.onset


def test_detector_refuses_bad_points():
    detector = OnsetDetector()
    detector.update(1, 0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="increase"):
        detector.update(1, 0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="finite"):
        detector.update(2, float("nan"), 0.1, 0.0)
    with pytest.raises(ValueError, match="same length"):
        find_onset([1, 2], [0.0], [0.1, 0.1], [0.0, 0.0])
