"""Best-of-k: the closed-form estimator against brute-force enumeration, and KL_bon by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from posttrain.ops.best_of_n import best_of_k, best_of_k_weights, best_of_ks, kl_bon


def brute_force(proxy: list[float], values: list[float], k: int) -> float:
    """Mean over every k-subset of the value of its proxy-best sample; tied maxima share equally."""
    results = []
    for subset in itertools.combinations(range(len(proxy)), k):
        top = max(proxy[i] for i in subset)
        tied = [values[i] for i in subset if proxy[i] == top]
        results.append(sum(tied) / len(tied))
    return sum(results) / len(results)


def test_kl_bon_by_hand():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert kl_bon(4) == pytest.approx(1.386294361 - 0.75)
    with pytest.raises(ValueError, match="k ≥ 1"):
        kl_bon(0)


def test_weights_by_hand():
    # n = 5, k = 2: C(i−1, 1)/C(5, 2) = (i − 1)/10
    np.testing.assert_allclose(best_of_k_weights(5, 2), [0, 0.1, 0.2, 0.3, 0.4])
    # k = n: only the largest; k = 1: uniform
    np.testing.assert_allclose(best_of_k_weights(4, 4), [0, 0, 0, 1])
    np.testing.assert_allclose(best_of_k_weights(4, 1), [0.25] * 4)


def test_weights_do_not_overflow_for_large_n():
    for k in (1, 2, 64, 512, 1024):
        weights = best_of_k_weights(1024, k)
        assert np.isfinite(weights).all()
        assert weights.sum() == pytest.approx(1.0, abs=1e-9)


def test_tie_rule_by_hand():
    # proxy 1, 2, 2, 3; k = 2: subsets give 20, 30, 40, (20+30)/2, 40, 40 -> 195/6
    assert best_of_k([1, 2, 2, 3], [10, 20, 30, 40], 2) == pytest.approx(32.5)


@pytest.mark.parametrize("seed", range(20))
def test_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    proxy = rng.integers(0, 4, n).astype(float).tolist()  # few distinct values: many ties
    values = rng.normal(size=n).tolist()
    for k in range(1, n + 1):
        assert best_of_k(proxy, values, k) == pytest.approx(brute_force(proxy, values, k), abs=1e-12)


def test_k1_is_the_mean_and_kn_the_argmax():
    rng = np.random.default_rng(0)
    proxy, values = rng.normal(size=30), rng.normal(size=30)
    assert best_of_k(proxy, values, 1) == pytest.approx(values.mean())
    assert best_of_k(proxy, values, 30) == pytest.approx(values[np.argmax(proxy)])
    assert best_of_k(proxy, proxy, 30) == pytest.approx(proxy.max())


def test_many_ks_at_once_match_one_at_a_time():
    rng = np.random.default_rng(1)
    proxy, values = rng.normal(size=64), rng.normal(size=64)
    ks = [1, 2, 4, 8, 16, 32, 64]
    np.testing.assert_allclose(best_of_ks(proxy, values, ks), [best_of_k(proxy, values, k) for k in ks])


def test_best_of_k_of_the_proxy_rises_with_k():
    proxy = np.random.default_rng(2).normal(size=100)
    curve = best_of_ks(proxy, proxy, [1, 2, 4, 8, 16, 32, 64, 100])
    assert (np.diff(curve) > 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="1 ≤ k ≤ n"):
        best_of_k([1, 2], [1, 2], 3)
    with pytest.raises(ValueError, match="1 ≤ k ≤ n"):
        best_of_k([1, 2], [1, 2], 0)
    with pytest.raises(ValueError, match="equal length"):
        best_of_k([1, 2], [1, 2, 3], 1)
    with pytest.raises(ValueError, match="finite"):
        best_of_k([1, float("nan")], [1, 2], 1)
