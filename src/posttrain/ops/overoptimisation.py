"""Reward over-optimisation: Gao et al.'s functional forms, and an online detector of its onset.

Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization": with
d = √KL(π‖π_init) in nats, the gold reward relative to the initial policy follows
    RL (PPO):     R(d) = d·(α − β·ln d)
    best-of-n:    R(d) = d·(α − β·d)
Both rise, peak and fall when β > 0: the proxy keeps improving while the true reward turns down.

The detector follows the gold reward during training and says when it has started to fall while
the proxy keeps rising; its rule (and why noise enters it) is in ``OnsetDetector``'s docstring.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FORMS = ("rl", "bon")


# --- fits of the functional forms ----------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """gold ≈ start + R(d), with R of ``form``; ``peak_d``/``peak_gold`` are None without an interior maximum."""

    form: str  # "rl" or "bon"
    alpha: float
    beta: float
    start: float  # c: the fitted gold at d = 0
    peak_d: float | None  # d* = argmax R over d > 0
    peak_gold: float | None  # c + R(d*)
    r2: float  # 1 − SS_res/SS_tot (1.0 when every gold value is the same and fitted exactly)
    n_points: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_terms(d: np.ndarray, form: str) -> np.ndarray:
    """The term β multiplies (with a minus sign): d·ln d (rl; 0 at d = 0, its limit) or d² (bon). (N,)"""
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)  # ln 1 = 0 puts d·ln d = 0 at d = 0
        return d * np.log(safe)
    return d * d


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def peak(alpha: float, beta: float, form: str) -> float | None:
    """d* = argmax over d > 0 of R(d), or None when R has no interior maximum there.

    rl:  R'(d) = α − β·(ln d + 1) = 0  →  d* = exp(α/β − 1), a maximum iff β > 0 (R'' = −β/d).
    bon: R'(d) = α − 2β·d = 0          →  d* = α/(2β), a maximum iff β > 0, inside d > 0 iff α > 0.
    """
    _check_form(form)
    if beta <= 0:
        return None
    if form == "rl":
        exponent = alpha / beta - 1
        return math.exp(exponent) if exponent < 700 else None  # beyond e^700 the peak is "never" (and overflows)
    return alpha / (2 * beta) if alpha > 0 else None


def fit_curve(d, gold, form: str) -> Fit:
    """Least squares of gold = c + d·(α − β·ln d) (form "rl") or c + d·(α − β·d) (form "bon").

    The model is linear in (c, α, β): columns [1, d, −d·ln d] or [1, d, −d²], solved by
    ``numpy.linalg.lstsq``. Peak: d* from ``peak``; c + R(d*) = c + β·d* (rl), c + α²/(4β) (bon).
    d ≥ 0 (√KL), at least 3 distinct values: d·ln d and d² are strictly convex, so 3 distinct d make
    the design full rank.
    """
    _check_form(form)
    d, gold = np.asarray(d, dtype=np.float64), np.asarray(gold, dtype=np.float64)  # (N,), (N,)
    if d.shape != gold.shape or d.ndim != 1:
        raise ValueError(f"d and gold must be 1-D of the same length, got shapes {d.shape} and {gold.shape}")
    if len(d) < 3:
        raise ValueError(f"fitting c, α and β needs at least 3 points, got {len(d)}")
    if not (np.isfinite(d).all() and np.isfinite(gold).all()):
        raise ValueError("d and gold must be finite")
    if (d < 0).any():
        raise ValueError(f"d = √KL must be non-negative, got {d.min()}")
    if len(np.unique(d)) < 3:
        raise ValueError(f"the fit needs at least 3 distinct values of d, got {len(np.unique(d))} ({np.unique(d)})")
    design = np.stack([np.ones_like(d), d, -_shape_terms(d, form)], axis=1)  # (N, 3)
    (start, alpha, beta), *_ = np.linalg.lstsq(design, gold, rcond=None)
    residual = gold - design @ np.array([start, alpha, beta])  # (N,)
    total = float(((gold - gold.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    peak_d = peak(float(alpha), float(beta), form)
    peak_gold = None if peak_d is None else float(start + (beta * peak_d if form == "rl" else alpha**2 / (4 * beta)))
    return Fit(form, float(alpha), float(beta), float(start), peak_d, peak_gold, r2, len(d))


def predict(fit: Fit, d) -> np.ndarray:
    """start + d·(α − β·ln d) or start + d·(α − β·d) at each d (d ≥ 0). Same shape as d."""
    d = np.asarray(d, dtype=np.float64)
    return fit.start + fit.alpha * d - fit.beta * _shape_terms(d, fit.form)


# --- the online detector -------------------------------------------------------------------


def sem(std: float, count: float) -> float:
    """Standard error of a mean of ``count`` samples with per-sample standard deviation ``std``: std/√count."""
    if count < 1:
        raise ValueError(f"the standard error needs at least one sample, got count {count}")
    return float(std) / math.sqrt(count)


@dataclass(frozen=True)
class Onset:
    """The first iteration at which the gold reward had fallen significantly while the proxy rose."""

    step: int  # the iteration the detector fired
    peak_step: int  # the last iteration of the window with the best smoothed gold
    best_gold: float  # that window's smoothed gold
    gold: float  # the smoothed gold at ``step``
    drop: float  # best_gold − gold
    noise: float  # √(noise_best² + noise_now²): the standard error of ``drop``
    proxy_at_peak: float  # smoothed proxy of the best window
    proxy: float  # smoothed proxy at ``step``

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_z(z: float, windows: int, window: int) -> float:
    """z widened for the windows looked at so far: √(z² + 2·ln max(1, windows/window)).

    Among M independent standard normals the largest is about √(2 ln M) (the Gaussian maximum), so
    the best of M noisy windows sits that many standard errors above its true level, and every new
    window is one more look at a plateau. Windows that overlap are not independent: ``windows``
    trailing windows hold about windows/window independent ones.
    """
    return math.sqrt(z * z + 2 * math.log(max(1.0, windows / window)))


class OnsetDetector:
    """Online detector of over-optimisation: the gold reward has fallen, beyond its noise, while the proxy rose.

    Fed once per gold-scored iteration with the rollout's mean gold, that mean's standard error
    (``sem``) and the mean proxy score. Over the trailing ``window`` iterations (once that many are in):
        smoothed gold  g = mean of the last ``window`` golds
        its noise      s = √(Σ sem_i²) / window          (the standard error of that mean)
        smoothed proxy p = mean of the last ``window`` proxies
    The best window is the one with the highest g so far (``best_step``: its last iteration). With M
    the number of complete windows so far, the detector fires when, for ``patience`` consecutive updates,
        g_best − g_now > z_M · √(s_best² + s_now²)   and   p_now > p_best,
        z_M = √(z² + 2·ln max(1, M/window))            (``effective_z``).
    Why the noise: a rollout's mean gold moves by its standard error from iteration to iteration
    (0.09–0.18 per-sample standard deviations for 128–32 samples), so the running best of a noisy
    curve always sits above the current value; a threshold without noise fires on every run, a
    flat one included. Why z_M rather than z: the best window is the largest of many noisy ones,
    inflated by about √(2 ln M) standard errors, and a long run looks many times. With a fixed
    z = 3 the detector fired on 64% of 200-iteration plateaus (and 16–26% of slowly rising curves);
    with z_M, on 8–9% (rising: 1–1.4%); bench/onset_false_alarms.py, table in docs/overoptimisation.md.
    """

    def __init__(self, window: int = 5, z: float = 3.0, patience: int = 2) -> None:
        if window < 1 or patience < 1 or not z > 0:
            raise ValueError(f"window and patience must be at least 1 and z positive, got {window}, {patience}, {z}")
        self.window, self.z, self.patience = window, z, patience
        self.recent: deque[tuple[int, float, float, float]] = deque(maxlen=window)  # (step, gold, sem, proxy)
        self.best_step: int | None = None
        self.best_smoothed: float | None = None
        self.best_noise: float | None = None
        self.best_proxy: float | None = None
        self.windows = 0  # M: complete windows seen
        self.streak = 0  # consecutive updates with a significant fall
        self.improved = False
        self.onset: Onset | None = None

    def _smoothed(self) -> tuple[float, float, float]:
        """(g, s, p) of the trailing window: mean gold, its standard error, mean proxy."""
        _, golds, sems, proxies = zip(*self.recent, strict=True)
        noise = math.sqrt(sum(x * x for x in sems)) / self.window
        return sum(golds) / self.window, noise, sum(proxies) / self.window

    def update(self, step: int, gold: float, gold_sem: float, proxy: float) -> Onset | None:
        """Add one iteration; returns the Onset at the update that first fires, None otherwise."""
        if not all(math.isfinite(x) for x in (gold, gold_sem, proxy)) or gold_sem < 0:
            raise ValueError(f"gold, gold_sem and proxy must be finite, gold_sem ≥ 0: {gold}, {gold_sem}, {proxy}")
        if self.recent and step <= self.recent[-1][0]:
            raise ValueError(f"steps must increase: {step} after {self.recent[-1][0]}")
        self.recent.append((int(step), float(gold), float(gold_sem), float(proxy)))
        self.improved = False
        if len(self.recent) < self.window:
            return None
        smoothed, noise, proxy_now = self._smoothed()
        self.windows += 1
        if self.best_smoothed is None or smoothed > self.best_smoothed:
            self.best_step, self.best_smoothed, self.best_noise, self.best_proxy = step, smoothed, noise, proxy_now
            self.improved, self.streak = True, 0
            return None
        combined = math.sqrt(self.best_noise**2 + noise**2)
        threshold = effective_z(self.z, self.windows, self.window) * combined
        fallen = self.best_smoothed - smoothed > threshold and proxy_now > self.best_proxy
        self.streak = self.streak + 1 if fallen else 0
        if self.onset is not None or self.streak < self.patience:
            return None
        self.onset = Onset(step, self.best_step, self.best_smoothed, smoothed, self.best_smoothed - smoothed,
                           combined, self.best_proxy, proxy_now)  # fmt: skip
        return self.onset

    def state_dict(self) -> dict[str, Any]:
        """Everything ``update`` depends on, JSON-able (floats survive JSON exactly)."""
        return {
            "settings": {"window": self.window, "z": self.z, "patience": self.patience},
            "recent": [list(entry) for entry in self.recent],
            "best_step": self.best_step,
            "best_smoothed": self.best_smoothed,
            "best_noise": self.best_noise,
            "best_proxy": self.best_proxy,
            "windows": self.windows,
            "streak": self.streak,
            "improved": self.improved,
            "onset": None if self.onset is None else self.onset.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s state; it must come from a detector with the same window, z and patience."""
        mine = {"window": self.window, "z": self.z, "patience": self.patience}
        if state["settings"] != mine:
            raise ValueError(f"detector state saved with {state['settings']}, this detector has {mine}")
        self.recent = deque((tuple(entry) for entry in state["recent"]), maxlen=self.window)
        self.best_step, self.best_smoothed = state["best_step"], state["best_smoothed"]
        self.best_noise, self.best_proxy = state["best_noise"], state["best_proxy"]
        self.windows, self.streak, self.improved = state["windows"], state["streak"], state["improved"]
        self.onset = None if state["onset"] is None else Onset(**state["onset"])


def find_onset(steps, gold, gold_sem, proxy, window: int = 5, z: float = 3.0, patience: int = 2) -> Onset | None:
    """Replay ``OnsetDetector`` over a whole trace (equal-length sequences); the Onset it gives, or None."""
    lengths = {len(steps), len(gold), len(gold_sem), len(proxy)}
    if len(lengths) != 1:
        raise ValueError(f"steps, gold, gold_sem and proxy must have the same length, got {sorted(lengths)}")
    detector = OnsetDetector(window, z, patience)
    for point in zip(steps, gold, gold_sem, proxy, strict=True):
        detector.update(*point)
    return detector.onset
