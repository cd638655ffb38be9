"""What posttrain's HTML reports share: number formatting, escaping, PNG embedding, moving averages,
and the reward-hacking figure (proxy and gold reward per iteration and against √KL).

The figure follows Gao, Schulman and Hilton 2022, "Scaling Laws for Reward Model Overoptimization":
the x axis d = √KL(π‖π_ref) in nats, and the fitted RL form gold ≈ c + d·(α − β·ln d) with its peak d*
(``posttrain.ops.overoptimisation``). Both ``posttrain report`` and the lab's report draw it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from posttrain.ops.overoptimisation import Fit, find_onset, fit_curve, predict, sem

DASH = "–"
PROXY_COLOUR, GOLD_COLOUR, ONSET_COLOUR, FIT_COLOUR = "#dd8452", "#2a7ab0", "#c0392b", "#333333"
RUN_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
FIT_FIELDS = ("form", "alpha", "beta", "start", "peak_d", "peak_gold", "r2", "n_points")
ONSET_FIELDS = ("step", "peak_step", "best_gold", "gold", "drop", "noise", "proxy_at_peak", "proxy")
CSS = """
body{font-family:system-ui,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}.sub{color:#666}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em;width:100%}th{background:#f3f3f3}
th,td{border:1px solid #ccc;padding:.35em .5em;vertical-align:top;text-align:left}.note{color:#666;font-style:italic}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.answer{word-break:break-word}
.tag{font-size:.78em;color:#555;display:block}img{max-width:100%;height:auto;display:block;margin:.6em 0}
"""


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, infinite, not a number)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def fmt(value: Any, kind: str = "num3") -> str:
    """A number as text: "pct" 12%, "signed" +0.25, "int" 12, "num1" 6.5, "num2" 0.25, "g" 4 significant
    digits, else 1.234; "–" if missing or NaN."""
    x = number(value)
    if x is None:
        return DASH
    spec = {"pct": ".0%", "signed": "+.2f", "int": ".0f", "num1": ".1f", "num2": ".2f", "g": ".4g"}.get(kind, ".3f")
    return format(x, spec)


esc = html.escape  # every text put in a page by hand goes through it (quotes too)


def figure_png(fig: Figure) -> str:
    """An <img> tag holding the figure as a base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def smoothing(n: int) -> int:
    """The moving average's window: 8 points, fewer for a short run (a smoke run's 2 stay raw)."""
    return min(8, max(1, n // 4))


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over ``window`` neighbours (fewer at the ends), so the curve does not lag the points."""
    chunks = [values[max(0, i - window // 2) : i + (window + 1) // 2] for i in range(len(values))]
    return [sum(chunk) / len(chunk) for chunk in chunks]


def plain_text(value: Any, limit: int) -> str:
    """A prompt or completion as plain text (escape it): chat messages as "role: content" lines, control
    characters as their visible Unicode pictures (U+2400 + code, ␡), at most ``limit`` characters."""
    if isinstance(value, list):
        value = "\n".join(f"{m['role']}: {m['content']}" if isinstance(m, dict) and {"role", "content"} <= set(m)
                          else json.dumps(m, ensure_ascii=False) for m in value)  # fmt: skip
    text = "".join(chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\n\t" else "␡" if c == "\x7f" else c
                   for c in str(value))  # fmt: skip
    return text if len(text) <= limit else text[:limit] + "…"


def sorted_points(xs: list, ys: list) -> tuple[list[float], list[float]]:
    """The (x, y) pairs where both are finite numbers, sorted by x (so a moving average runs along the x axis)."""
    points = sorted((x, y) for x, y in zip(map(number, xs), map(number, ys), strict=True) if None not in (x, y))
    return [x for x, _ in points], [y for _, y in points]


def fit_from(value: Any) -> Fit | None:
    """A fit as overoptimisation.json stores it (``Fit.as_dict()``), or None when it is absent or malformed."""
    if not isinstance(value, dict) or set(value) != set(FIT_FIELDS) or value["form"] not in ("rl", "bon"):
        return None
    numbers = [number(value[k]) for k in ("alpha", "beta", "start", "r2", "n_points")]
    peaks = [value[k] is None or number(value[k]) is not None for k in ("peak_d", "peak_gold")]
    return Fit(**value) if None not in numbers and all(peaks) else None


def onset_from(value: Any) -> dict[str, float] | None:
    """An onset as overoptimisation.json stores it (``Onset.as_dict()``), or None when absent or malformed."""
    if not isinstance(value, dict) or any(number(value.get(k)) is None for k in ONSET_FIELDS):
        return None
    return {k: float(value[k]) for k in ONSET_FIELDS}


def fit_sentence(fit: Fit) -> str:
    """The fit in words (plain text: escape it)."""
    shape = "c + d·(α − β·ln d)" if fit.form == "rl" else "c + d·(α − β·d)"
    where = (f"peaks at √KL = {fmt(fit.peak_d, 'g')} with gold {fmt(fit.peak_gold, 'signed')}"
             if fit.peak_d is not None else "has no peak (the gold does not turn down)")  # fmt: skip
    return (
        f"Fitted gold ≈ {shape} (Gao et al. 2022) over {fit.n_points} iterations: c = {fmt(fit.start, 'g')}, "
        f"α = {fmt(fit.alpha, 'g')}, β = {fmt(fit.beta, 'g')}, R² = {fmt(fit.r2, 'num2')}; the curve {where}."
    )


def onset_sentence(onset: dict[str, float]) -> str:
    """The detector's verdict in words (plain text: escape it)."""
    return (
        f"Over-optimisation detected at iteration {fmt(onset['step'], 'int')}: the smoothed gold reward fell "
        f"from {fmt(onset['best_gold'], 'signed')} (window ending at iteration {fmt(onset['peak_step'], 'int')}) "
        f"to {fmt(onset['gold'], 'signed')}, {fmt(onset['drop'] / max(onset['noise'], 1e-12), 'num1')} times its "
        f"noise, while the proxy rose from {fmt(onset['proxy_at_peak'], 'g')} to {fmt(onset['proxy'], 'g')}."
    )


@dataclass
class Trace:
    """One RL run for the hacking figure: per logged iteration its √KL, mean proxy and mean gold (None where
    not measured), and optionally the fit of gold against √KL and the detector's onset."""

    name: str
    steps: list[float]
    sqrt_kl: list[float | None]
    proxy: list[float | None]
    gold: list[float | None]
    fit: Fit | None = None
    onset: dict[str, float] | None = None
    colours: tuple[str, str] = field(default=(PROXY_COLOUR, GOLD_COLOUR))  # (proxy, gold)

    def values(self, key: str) -> list[float | None]:
        """The proxy or the gold values."""
        return self.proxy if key == "proxy" else self.gold


def metrics_trace(name: str, records: list[dict], overoptimisation: dict | None, window: int = 5,
                  z: float = 3.0) -> Trace:  # fmt: skip
    """An RL run's trace from its metrics.jsonl records (the iterations with ``objective/scores``; step 0 holds
    only the held-out evaluation), with the fit and onset of its overoptimisation.json, or without that file
    computed here: ``fit_curve`` of gold against √KL (3 distinct √KL at least) and ``find_onset`` with the
    detector's ``window`` and ``z`` over the iterations scored by gold."""
    by_step = {r["step"]: r for r in records if number(r.get("objective/scores")) is not None}  # the last one wins
    rows = [by_step[step] for step in sorted(by_step)]
    sqrt_kl = [r.get("objective/sqrt_kl", math.sqrt(r["objective/kl"]) if r.get("objective/kl", -1) >= 0 else None)
               for r in rows]  # fmt: skip
    trace = Trace(name, [r["step"] for r in rows], sqrt_kl, [r["objective/scores"] for r in rows],
                  [r.get("objective/gold") for r in rows])  # fmt: skip
    if overoptimisation is not None:
        fit, onset = fit_from(overoptimisation.get("fit")), onset_from(overoptimisation.get("onset"))
        return replace(trace, fit=fit, onset=onset)
    d, gold = sorted_points(trace.sqrt_kl, trace.gold)
    fit = fit_curve(d, gold, "rl") if len(set(d)) >= 3 and min(d) >= 0 else None
    keys = ("objective/gold", "objective/gold_std", "objective/gold_count")
    scored = [r for r in rows if all(number(r.get(k)) is not None for k in keys)
              and r["objective/gold_count"] >= 1 and r["objective/gold_std"] >= 0]  # fmt: skip
    gold_sem = [sem(r["objective/gold_std"], r["objective/gold_count"]) for r in scored]
    onset = find_onset([r["step"] for r in scored], [r["objective/gold"] for r in scored], gold_sem,
                       [r["objective/scores"] for r in scored], window=window, z=z)  # fmt: skip
    return replace(trace, fit=fit, onset=onset.as_dict() if onset else None)


def draw_series(ax, xs: list, ys: list, colour: str, label: str) -> None:
    """Raw points, and their moving average as a bold line (``label`` on the line, for tests and legends)."""
    xs, ys = sorted_points(xs, ys)
    if not xs:
        return
    ax.scatter(xs, ys, s=12, color=colour, alpha=0.3, linewidths=0)
    ax.plot(xs, moving_average(ys, smoothing(len(ys))), color=colour, lw=2, label=label)


def draw_fit(ax, trace: Trace, colour: str) -> None:
    """The fitted curve over the run's √KL range, and its peak d* when it lies within 1.5 times that range."""
    reach = max((x for x in map(number, trace.sqrt_kl) if x is not None), default=0.0)
    if trace.fit is None or reach <= 0:
        return
    d = np.linspace(0.0, reach, 200)  # (200,)
    ax.plot(d, predict(trace.fit, d), color=colour, ls="--", lw=1.5, label=f"fit {trace.name}")
    if trace.fit.peak_d is not None and trace.fit.peak_d <= 1.5 * reach:
        ax.axvline(trace.fit.peak_d, color=colour, ls=":", lw=1.5, label=f"d* {trace.name}")


def draw_onset(axes_by_x: dict[str, Any], trace: Trace, colour: str) -> None:
    """A vertical line at the onset iteration (and at that iteration's √KL on the √KL panels)."""
    if trace.onset is None:
        return
    step = trace.onset["step"]
    at = [number(k) for s, k in zip(trace.steps, trace.sqrt_kl, strict=True) if number(s) == step]
    positions = {"step": step, "sqrt_kl": at[0] if at else None}
    for x_key, axes in axes_by_x.items():
        for ax in axes:
            if positions[x_key] is not None:
                ax.axvline(positions[x_key], color=colour, ls="-.", lw=1.2, label=f"onset {trace.name}")


def hacking_figure(traces: list[Trace], reference: str = "the reference", colours: list[str] | None = None) -> Figure:
    """Proxy (top row) and gold reward (bottom row, when any trace has gold) per iteration (left) and against
    √KL to ``reference`` (right): points per iteration, moving averages, the fit with its d*, the onset.
    One trace keeps the proxy orange and the gold blue; several get one colour per run (``colours``)."""
    if len(traces) > 1:
        colours = colours or cycle(len(traces))
        traces = [replace(t, colours=(c, c)) for t, c in zip(traces, colours, strict=True)]
    rows = [("proxy", "proxy reward")] + ([("gold", "gold reward")] if any(any_number(t.gold) for t in traces) else [])
    fig = Figure(figsize=(10, 3.2 * len(rows) + 0.6))
    grid = np.atleast_2d(fig.subplots(len(rows), 2, sharex="col"))  # (rows, 2)
    for r, (key, ylabel) in enumerate(rows):
        for t in traces:
            colour = t.colours[r]
            draw_series(grid[r, 0], t.steps, t.values(key), colour, f"{key} {t.name}")
            draw_series(grid[r, 1], t.sqrt_kl, t.values(key), colour, f"{key} {t.name}")
        grid[r, 0].set_ylabel(ylabel)
    single = len(traces) == 1
    for t in traces:
        draw_onset({"step": grid[:, 0], "sqrt_kl": grid[:, 1]}, t, ONSET_COLOUR if single else t.colours[0])
        if len(rows) == 2:
            draw_fit(grid[1, 1], t, FIT_COLOUR if single else t.colours[1])
    grid[-1, 0].set_xlabel("iteration")
    grid[-1, 1].set_xlabel(f"√KL to {reference} (√nats)")
    grid[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=legend_handles(traces), loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight(), hspace=0.12, wspace=0.25)
    return fig


def any_number(values: list) -> bool:
    return any(number(v) is not None for v in values)


def cycle(n: int) -> list[str]:
    """``n`` run colours (the palette repeats beyond eight runs)."""
    return [RUN_COLOURS[i % len(RUN_COLOURS)] for i in range(n)]


def legend_handles(traces: list[Trace]) -> list[Line2D]:
    """What the marks mean: a run per colour (several runs), points, averages, fit, d* and onset."""
    grey = "#555555"
    handles = [Line2D([], [], color=t.colours[0], lw=2, label=t.name) for t in traces] if len(traces) > 1 else []
    handles += [Line2D([], [], color=grey, marker="o", ls="", alpha=0.4, label="one iteration"),
                Line2D([], [], color=grey, lw=2, label="moving average")]  # fmt: skip
    if any(t.fit is not None for t in traces):
        handles += [Line2D([], [], color=grey, ls="--", label="fit (Gao et al. 2022)"),
                    Line2D([], [], color=grey, ls=":", label="d*: peak of the fit")]  # fmt: skip
    if any(t.onset is not None for t in traces):
        handles.append(Line2D([], [], color=ONSET_COLOUR if len(traces) == 1 else grey, ls="-.", label="onset"))
    return handles


def curves_figure(panels: list[tuple[str, list[str]]], runs: list[tuple[str, list[dict]]], xlabel: str) -> Figure:
    """One panel per (title, metric keys), three panels a row: each key in its own line style, each run
    (name, metrics.jsonl records) in its own colour (``cycle``); a faint line per logged value, a bold moving
    average."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4 * columns, 2.9 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()  # (rows * columns,)
    colours, styles = cycle(len(runs)), ("-", "--", ":", "-.")
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for k, key in enumerate(keys):
            for colour, (_, records) in zip(colours, runs, strict=True):
                steps, values = sorted_points([r.get("step") for r in records], [r.get(key) for r in records])
                if steps:
                    ax.plot(steps, values, color=colour, ls=styles[k % 4], lw=0.8, alpha=0.35)
                    smooth = moving_average(values, smoothing(len(values)))
                    marker = "o" if len(steps) <= 2 else None  # a lone point (a final evaluation) stays visible
                    ax.plot(steps, smooth, color=colour, ls=styles[k % 4], lw=1.8, marker=marker, label=key)
        if np.ptp(ax.get_xlim()) < 2:  # every point at one step: keep whole-number ticks around it
            middle = round(sum(ax.get_xlim()) / 2)
            ax.set_xlim(middle - 1, middle + 1)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=8)
        if len(keys) > 1:
            key_handles = [Line2D([], [], color="#555555", ls=styles[k % 4], label=key) for k, key in enumerate(keys)]
            ax.legend(handles=key_handles, fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if len(runs) > 1:
        handles = [Line2D([], [], color=c, lw=2, label=name) for c, (name, _) in zip(colours, runs, strict=True)]
        fig.legend(handles=handles, loc="upper center", ncol=min(4, len(runs)), fontsize=8, frameon=False)
    fig.subplots_adjust(top=1 - 0.6 / fig.get_figheight(), hspace=0.6, wspace=0.3)
    return fig
