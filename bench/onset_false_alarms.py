"""The over-optimisation detector on synthetic gold curves: false alarms and detection delay.

Each trace is one RL run of T gold-scored iterations. Iteration t scores a rollout of n samples
whose gold has per-sample standard deviation 1 around the true curve, so the caller's inputs are
as in training: the rollout mean (true value + N(0, 1/n)), its standard error from the measured
sample std (std · √(χ²_{n−1}/(n−1)), over √n), and a proxy that keeps rising (2·d plus its own
noise). d = √KL grows as √t (KL linear in t). Curves, in per-sample standard deviations:
  rising   gold = G·(1 − exp(−3t/T)): rises, ever more slowly (close to a plateau at the end)
  flat     gold = 0: a plateau from the start, the proxy still rising
  peak     Gao et al.'s RL form d·(α − β·ln d), peaking at t = T/4 (d* at half the final d), gain G
The false-alarm rate is the share of traces where the detector fires on a rising or flat curve;
for peaks, the share detected and the delay (iterations after the true peak) and the true gold
lost by then (as a fraction of the gain G).

    python bench/onset_false_alarms.py [--seeds 2000] [--window 5] [--z 3] [--patience 2] [--fixed-z]

``--fixed-z`` measures the rule without the correction for the number of windows (z_M = z).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from posttrain.ops import overoptimisation

GAIN = 0.5  # G: the rise of the gold reward to its peak, in per-sample standard deviations


def true_curve(kind: str, t: np.ndarray, total: int) -> np.ndarray:
    """The noiseless gold of iterations t = 1..T. (T,)"""
    if kind == "rising":
        return GAIN * (1 - np.exp(-3 * t / total))
    if kind == "flat":
        return np.zeros(len(t))
    d_star, d = 1.0, 2.0 * np.sqrt(t / total)  # d* = 1 reached at t = T/4
    beta = GAIN / d_star  # peak gain = β·d*
    alpha = beta * (1 + math.log(d_star))  # d* = exp(α/β − 1)
    return d * (alpha - beta * np.log(d))


def trace(kind: str, total: int, n: int, rng: np.random.Generator) -> tuple:
    """One run's (steps, gold, gold_sem, proxy, true gold)."""
    t = np.arange(1, total + 1)
    truth = true_curve(kind, t, total)
    gold = truth + rng.normal(0, 1 / math.sqrt(n), total)
    std = np.sqrt(rng.chisquare(n - 1, total) / (n - 1))  # the measured per-sample std
    proxy = 2 * np.sqrt(t / total) + rng.normal(0, 1 / math.sqrt(n), total)
    return t, gold, std / math.sqrt(n), proxy, truth


def measure(kind: str, total: int, n: int, args) -> dict:
    """Over ``args.seeds`` traces: share fired, and for peaks the delays and gold lost when detected."""
    rng = np.random.default_rng([total, n, {"rising": 0, "flat": 1, "peak": 2}[kind]])
    fired, delays, lost = 0, [], []
    for _ in range(args.seeds):
        steps, gold, sems, proxy, truth = trace(kind, total, n, rng)
        onset = overoptimisation.find_onset(steps.tolist(), gold.tolist(), sems.tolist(), proxy.tolist(),
                           args.window, args.z, args.patience)  # fmt: skip
        if onset is None:
            continue
        fired += 1
        peak = int(np.argmax(truth))
        delays.append(onset.step - steps[peak])
        lost.append((truth[peak] - truth[onset.step - 1]) / GAIN)
    return {"rate": fired / args.seeds, "delays": delays, "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--z", type=float, default=3.0)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--fixed-z", action="store_true", help="compare: the rule without z's correction")
    args = parser.parse_args()
    if args.fixed_z:
        overoptimisation.effective_z = lambda z, windows, window: z  # the detector looks the function up per update
    rule = "z fixed" if args.fixed_z else "z widened per window"
    print(
        f"window {args.window}, z {args.z} ({rule}), patience {args.patience}; {args.seeds} seeds per row; G = {GAIN}"
    )
    print("| T | n | false alarms, rising | false alarms, flat | peak detected | delay (median, 90%) | gold lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for total in (50, 100, 200):
        for n in (32, 128):
            rising, flat, peak = (measure(kind, total, n, args) for kind in ("rising", "flat", "peak"))
            delay = (
                f"{np.median(peak['delays']):.0f}, {np.quantile(peak['delays'], 0.9):.0f}" if peak["delays"] else "–"
            )
            lost = f"{np.median(peak['lost']):.2f} G" if peak["lost"] else "–"
            print(
                f"| {total} | {n} | {rising['rate']:.1%} | {flat['rate']:.1%} | {peak['rate']:.1%} | {delay} | {lost} |"
            )


if __name__ == "__main__":
    main()
