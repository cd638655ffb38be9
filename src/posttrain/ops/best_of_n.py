"""Best-of-k sampling, measured from one set of n samples per prompt.

Best-of-k draws k completions from the policy and keeps the one the proxy reward scores highest.
Its KL to the policy has a closed form, and its expected reward (proxy or gold) can be estimated
without bias from n ≥ k samples by averaging over all their k-subsets at once, which beats drawing
fresh k-subsets (no sampling noise on top of the samples' own). Sources: Stiennon et al. 2020,
"Learning to summarize from human feedback" (appendix on best-of-N); Gao, Schulman, Hilton 2022,
"Scaling Laws for Reward Model Overoptimization" (section on best-of-n, with the estimator).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln


def kl_bon(k: int) -> float:
    """KL(best-of-k ‖ base) = ln k − (k − 1)/k nats (Stiennon et al. 2020; Gao et al. 2022).

    Exact for a continuous proxy without ties; an upper bound on the true KL in general (Beirami
    et al. 2024, "Theoretical guarantees on the best-of-n alignment policy").
    """
    if k < 1:
        raise ValueError(f"best-of-k needs k ≥ 1, got {k}")
    return math.log(k) - (k - 1) / k


def _log_comb(a: np.ndarray, b: int) -> np.ndarray:
    """ln C(a, b) for a ≥ b ≥ 0, through ln Γ so that C(1024, 512) does not overflow."""
    return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)


def best_of_k_weights(n: int, k: int) -> np.ndarray:
    """P(the i-th smallest of n is the largest of a uniform random k-subset) = C(i−1, k−1)/C(n, k), i = 1..n.

    (n,) weights, 0 for i < k, summing to 1 (the hockey-stick identity Σ_i C(i−1, k−1) = C(n, k)).
    """
    if not 1 <= k <= n:
        raise ValueError(f"best-of-k from n samples needs 1 ≤ k ≤ n, got k={k}, n={n}")
    rank = np.arange(1, n + 1, dtype=np.float64)  # (n,) i
    weights = np.zeros(n)
    ok = rank >= k
    weights[ok] = np.exp(_log_comb(rank[ok] - 1, k - 1) - _log_comb(np.float64(n), k))
    return weights


def _sorted_with_ties_averaged(proxy, values) -> np.ndarray:
    """``values`` in ascending order of ``proxy``, each replaced by the mean over the samples tied with it. (n,)"""
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if proxy.ndim != 1 or proxy.shape != values.shape or len(proxy) == 0:
        raise ValueError(f"proxy and values must be 1-D, non-empty, of equal length: {proxy.shape}, {values.shape}")
    if not (np.isfinite(proxy).all() and np.isfinite(values).all()):
        raise ValueError("proxy and values must be finite")
    order = np.argsort(proxy, kind="stable")
    _, group = np.unique(proxy[order], return_inverse=True)  # (n,) tie group of each sorted sample
    means = np.bincount(group, weights=values[order]) / np.bincount(group)
    return means[group]


def best_of_k(proxy, values, k: int) -> float:
    """Unbiased estimate of E[value of the proxy-best of k samples drawn without replacement from the n given].

    Averages over all C(n, k) subsets in closed form: with the samples sorted by proxy, the i-th
    smallest is the subset's best with probability C(i−1, k−1)/C(n, k), so
        estimate = Σ_i C(i−1, k−1)/C(n, k) · value_(i).
    Ties in proxy: the best of a subset is drawn uniformly among its tied maxima; in expectation
    that is the formula with each tied sample's value replaced by the mean over its tie group.
    k = 1 gives the mean of the values, k = n the value of the proxy's argmax.
    proxy, values: (n,).
    """
    ordered = _sorted_with_ties_averaged(proxy, values)  # (n,)
    return float(best_of_k_weights(len(ordered), k) @ ordered)


def best_of_ks(proxy, values, ks) -> np.ndarray:
    """``best_of_k`` for each k in ``ks``, sorting once. (len(ks),)"""
    ordered = _sorted_with_ties_averaged(proxy, values)  # (n,)
    return np.array([best_of_k_weights(len(ordered), k) @ ordered for k in ks])
