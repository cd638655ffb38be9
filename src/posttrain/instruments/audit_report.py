"""The words and pictures of ``posttrain audit``: findings in plain English, a forest plot of the bias
effects, a plot of annotator accuracy, and audit.html (Jinja2 with autoescape: every annotator name,
prompt and answer is text, never markup; the plots are inline base64 PNGs).

A bias finding is stated only when its interval excludes no effect (odds ratio 1, or a left share of
1/2). Since the audit examines many effects at once (each feature, overall and per annotator), the
decision uses intervals widened for their number (Bonferroni: z at 1 − 0.05 / (2m) for m effects), so
that a pool without bias yields no finding in 95% of audits; the sentence quotes the usual 95% interval,
which then excludes no effect too. Reliability findings are ``flag_unreliable``'s verdicts.
"""

from __future__ import annotations

from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
from statsmodels.stats.proportion import proportion_confint

from posttrain.instruments.plots import CSS, figure_png
from posttrain.ops.preference_bias import Z95

BINARY = ("confident", "hedging", "list_format", "markdown")
SHOWN_ANNOTATORS = 30  # rows per forest panel and accuracy plot: the annotators with the most labels
HYGIENE_VERBS = {  # issue -> (one row ..., several rows ...)
    "duplicate": ("repeats an earlier row of the same annotator", "repeat an earlier row of the same annotator"),
    "contradictory": ("reverses an earlier row of the same annotator", "reverse an earlier row of the same annotator"),
    "identical": ("has the same text as chosen and rejected", "have the same text as chosen and rejected"),
    "empty": ("has an empty prompt or answer", "have an empty prompt or answer"),
    "truncated": ("has an answer that stops mid-sentence", "have an answer that stops mid-sentence"),
    "pair_id_reused": ("reuses a pair_id with other content", "reuse a pair_id with other content"),
    "gold_conflict": ("contradicts the known answer of its pair", "contradict the known answer of their pair"),
}


# --- findings -----------------------------------------------------------------------------------


def num(value: float) -> str:
    """An odds ratio: three significant digits (so 1.04 does not read as 1)."""
    return f"{value:.3g}"


def effect_found(effect: dict | None, z: float) -> bool:
    """The widened interval log_odds ± z·se excludes 0 (se from the stored 95% Wald interval)."""
    if effect is None:
        return False
    se = (effect["high"] - effect["low"]) / (2 * Z95)
    return abs(effect["log_odds"]) > z * se


def position_found(position: dict | None, alpha: float) -> bool:
    """Wilson's interval at level 1 − alpha (the widened level) excludes a left share of 1/2."""
    if position is None:
        return False
    low, high = proportion_confint(position["left_chosen"], position["n"], alpha=alpha, method="wilson")
    return high < 0.5 or low > 0.5


def effect_sentence(who: str | None, feature: str, effect: dict) -> str:
    subject, s = ("Annotators", "") if who is None else (f"Annotator {who}", "s")
    odds = f"{num(effect['odds_ratio'])} (95% CI {num(effect['odds_ratio_low'])} to {num(effect['odds_ratio_high'])})"
    if feature == "length":
        longer = "longer" if effect["log_odds"] > 0 else "shorter"
        return (f"{subject} prefer{s} the {longer} answer: each 10 extra words multiply the odds of being chosen "
                f"by {odds}.")  # fmt: skip
    verb = "favour" if effect["log_odds"] > 0 else "avoid"
    words = effect["name"]
    return f"{subject} {verb}{s} answers with {words}: it multiplies the odds of being chosen by {odds}."


def position_sentence(who: str | None, position: dict) -> str:
    subject, s = ("Annotators", "") if who is None else (f"Annotator {who}", "s")
    left = position["share"] > 0.5
    share, low, high = (position["share"], position["low"], position["high"]) if left else (
        1 - position["share"], 1 - position["high"], 1 - position["low"])  # fmt: skip
    return (f"{subject} choose{s} the answer shown on the {'left' if left else 'right'} {share:.0%} of the time "
            f"(95% CI {low:.0%} to {high:.0%}, n = {position['n']}).")  # fmt: skip


def bias_findings(bias: dict) -> list[str]:
    """The pool's effects found, then each annotator's where the pool shows no such effect or the opposite."""
    overall, z = bias["overall"], bias["decision"]["z"]
    if overall is None:
        return []
    alpha = bias["decision"]["family_alpha"] / max(bias["decision"]["effects"], 1)
    out, pool_sign = [], {}
    for feature, effect in overall["joint"].items():
        if effect_found(effect, z):
            out.append(effect_sentence(None, feature, effect))
            pool_sign[feature] = np.sign(effect["log_odds"])
    if position_found(overall["position"], alpha):
        out.append(position_sentence(None, overall["position"]))
        pool_sign["position"] = np.sign(overall["position"]["share"] - 0.5)
    for annotator in bias["annotators"]:
        for feature, effect in (annotator["joint"] or {}).items():
            if effect_found(effect, z) and pool_sign.get(feature) != np.sign(effect["log_odds"]):
                out.append(effect_sentence(annotator["annotator"], feature, effect))
        position = annotator["position"]
        if position_found(position, alpha) and pool_sign.get("position") != np.sign(position["share"] - 0.5):
            out.append(position_sentence(annotator["annotator"], position))
    return out


def reliability_findings(reliability: dict) -> list[str]:
    out = []
    for flag in reliability["flagged"]:
        if flag["by"] == "gold":
            out.append(f"Annotator {flag['annotator']} agrees with the known answers {flag['accuracy']:.0%} of the "
                       f"time (n = {flag['n']}), far below the pool's median {flag['median']:.0%}.")  # fmt: skip
        else:
            out.append(f"Annotator {flag['annotator']} has an estimated accuracy (Dawid–Skene, from agreement with "
                       f"the others) of {flag['accuracy']:.0%} (95% CI {flag['low']:.0%} to {flag['high']:.0%}, "
                       f"n = {flag['n']}), far below the pool's median {flag['median']:.0%}.")  # fmt: skip
    return out


def hygiene_findings(hygiene: dict) -> list[str]:
    out = []
    for name, issue in hygiene.items():
        if issue["count"]:
            one, many = HYGIENE_VERBS[name]
            rows = ", ".join(map(str, issue["rows"])) + (", ..." if issue["count"] > len(issue["rows"]) else "")
            row_word = "row" if len(issue["rows"]) == 1 else "rows"
            subject = "1 row" if issue["count"] == 1 else f"{issue['count']} rows"
            out.append(f"{subject} {one if issue['count'] == 1 else many} ({row_word} {rows}).")
    return out


def findings(audit: dict) -> list[str]:
    """Plain-English sentences: unreliable annotators, bias effects, data problems."""
    return (
        reliability_findings(audit["reliability"]) + bias_findings(audit["bias"]) + hygiene_findings(audit["hygiene"])
    )


# --- plots --------------------------------------------------------------------------------------


def forest_groups(bias: dict) -> list[tuple[str, dict]]:
    """(label, effects group): the pool, then the annotators with estimates, most labels first."""
    estimated = [a for a in bias["annotators"] if a["joint"] is not None]
    estimated = sorted(estimated, key=lambda a: -a["n"])[:SHOWN_ANNOTATORS]
    return [("all annotators", bias["overall"])] + [(str(a["annotator"]), a) for a in estimated]


def forest_figure(bias: dict) -> Figure | None:
    """One panel per feature: odds ratio of being chosen (log scale) with 95% intervals, joint model (dots),
    joint model beyond the known answers (triangles, where gold is known) and the feature alone (squares),
    for the pool and each annotator; 1 is no effect."""
    if bias["overall"] is None:
        return None
    groups = forest_groups(bias)
    features = list(bias["features"])
    fig = Figure(figsize=(14, 1.2 + 0.28 * len(groups) * 2))
    axes = fig.subplots(2, 4, sharey=True).ravel()  # 7 panels: 5 features, position, the truth itself
    axes[-1].set_visible(False)
    for ax, feature in zip(axes, features, strict=False):
        drawn = False
        for row, (_, group) in enumerate(groups):
            marks = [
                ("joint", "o", "#2a7ab0", -0.2),
                ("given_gold", "^", "#55a868", 0.0),
                ("single", "s", "#dd8452", 0.2),
            ]
            if feature == "position":
                marks = [("position", "o", "#2a7ab0", 0.0)]
            for key, marker, colour, offset in marks:
                value = group[key] if feature == "position" else (group[key] or {}).get(feature)
                point = _odds(value, feature)
                if point is not None:
                    drawn = True
                    centre, low, high = np.clip(point, 1e-2, 1e2)
                    ax.errorbar([centre], [row + offset], xerr=[[centre - low], [high - centre]], fmt=marker,
                                color=colour, ms=4, capsize=2, mfc=colour if marker == "o" else "white")  # fmt: skip
        _odds_axis(ax, "odds of choosing the left answer" if feature == "position" else "odds ratio of being chosen")
        ax.set_title(bias["features"][feature], fontsize=9)
        if not drawn:
            ax.text(0.5, 0.5, "not estimable:\nthe feature never differs", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="#666", bbox={"facecolor": "white", "lw": 0})  # fmt: skip
    axes[0].set_yticks(range(len(groups)), [label for label, _ in groups])
    axes[0].set_ylim(len(groups) - 0.5, -0.5)  # the pool on top
    for ax in axes:
        ax.tick_params(labelsize=8)
    fig.legend(handles=_forest_legend(), loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.subplots_adjust(top=1 - 0.5 / fig.get_figheight(), hspace=0.45, wspace=0.08)
    return fig


def _odds_axis(ax, label: str) -> None:
    """A log-scale odds axis with plain tick labels (0.5, 1, 2) and a dashed line at 1, no effect."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.axvline(1.0, color="#999", lw=1, ls="--")
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ax.set_xlim(min(low, 0.5), max(high, 2.0))
    ax.xaxis.set_major_locator(FixedLocator([0.01, 0.03, 0.1, 0.25, 0.5, 1, 2, 4, 10, 30, 100]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label, fontsize=8)


def _odds(value: dict | None, feature: str) -> tuple[float, float, float] | None:
    """(odds ratio, low, high) of an effect; for position, the odds of choosing the left answer."""
    if value is None:
        return None
    if feature == "position":
        if value["intercept"] is None:
            return None
        return tuple(float(np.exp(value[k])) for k in ("intercept", "intercept_low", "intercept_high"))
    return value["odds_ratio"], value["odds_ratio_low"], value["odds_ratio_high"]


def _forest_legend() -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color="#2a7ab0", marker="o", ls="", label="joint model (every feature at once)"),
            Line2D([], [], color="#55a868", marker="^", ls="", label="joint model beyond the known answers"),
            Line2D([], [], color="#dd8452", marker="s", mfc="white", ls="", label="the feature alone")]  # fmt: skip


def accuracy_figure(reliability: dict) -> Figure | None:
    """Per annotator: Dawid–Skene accuracy (dots) and accuracy on the known answers (squares) with 95%
    intervals; dashed lines at the pool's medians."""
    series = [(name, reliability[name]) for name in ("dawid_skene", "gold") if reliability[name]]
    series = [(name, part) for name, part in series if part["available"]]
    if not series:
        return None
    counts: dict[str, int] = {}
    for _, part in series:
        for row in part["annotators"]:
            counts[row["annotator"]] = max(counts.get(row["annotator"], 0), row["n"])
    names = sorted(counts, key=lambda a: -counts[a])[:SHOWN_ANNOTATORS]
    fig = Figure(figsize=(7, 1.0 + 0.32 * len(names)))
    ax = fig.subplots()
    styles = {"dawid_skene": ("o", "#2a7ab0", -0.12, "Dawid–Skene"), "gold": ("s", "#c0392b", 0.12, "known answers")}
    for name, part in series:
        marker, colour, offset, label = styles[name]
        rows = {row["annotator"]: row for row in part["annotators"] if row["accuracy"] is not None}
        shown = [(i, rows[a]) for i, a in enumerate(names) if a in rows]
        if shown:
            y = [i + offset for i, _ in shown]
            x = np.array([row["accuracy"] for _, row in shown])
            err = np.array([[row["accuracy"] - row["low"], row["high"] - row["accuracy"]] for _, row in shown]).T
            ax.errorbar(x, y, xerr=err, fmt=marker, color=colour, ms=4, capsize=2, label=label)
            ax.axvline(float(np.median([row["accuracy"] for row in rows.values()])), color=colour, ls="--", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel="accuracy (95% interval); dashed: the pool's median")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


# --- the page -----------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def odds_text(effect: dict | None) -> str:
    if effect is None:
        return "–"
    return f"{num(effect['odds_ratio'])} [{num(effect['odds_ratio_low'])}, {num(effect['odds_ratio_high'])}]"


def value_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def accuracy_text(row: dict | None) -> str:
    if row is None or row["accuracy"] is None:
        return "–"
    return f"{row['accuracy']:.0%} [{row['low']:.0%}, {row['high']:.0%}] (n = {row['n']})"


def reliability_rows(reliability: dict) -> list[dict[str, Any]]:
    """One row per annotator: Dawid–Skene and gold accuracy, and the reasons it was flagged."""
    parts = {name: {row["annotator"]: row for row in (reliability[name] or {"annotators": []})["annotators"]}
             for name in ("dawid_skene", "gold")}  # fmt: skip
    names = list(dict.fromkeys([*parts["dawid_skene"], *parts["gold"]]))
    reasons = {name: [f["reason"] for f in reliability["flagged"] if f["annotator"] == name] for name in names}
    return [{"annotator": name, "dawid_skene": parts["dawid_skene"].get(name), "gold": parts["gold"].get(name),
             "flags": reasons[name]} for name in names]  # fmt: skip


def html_page(audit: dict) -> str:
    """audit.html, self-contained, every text escaped."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(pct=pct, odds=odds_text, value=value_text, accuracy=accuracy_text)
    figures = {"forest": forest_figure(audit["bias"]), "accuracy": accuracy_figure(audit["reliability"])}
    images = {name: None if fig is None else Markup(figure_png(fig)) for name, fig in figures.items()}  # base64 only
    return environment.from_string(TEMPLATE).render(
        audit=audit, css=Markup(CSS), images=images, reliability_rows=reliability_rows(audit["reliability"])
    )


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>posttrain audit: {{ audit.source }}</title>
<style>{{ css }}</style>
</head>
<body>
<h1>Audit of preference data</h1>
{% set c = audit.counts %}
<p class="sub"><code>{{ audit.source }}</code>: {{ c.rows }} rows, {{ c.pairs }} pairs, {{ c.annotators }} annotators
({{ c.rows_without_annotator }} rows without one), {{ c.rows_with_gold }} rows with a known answer,
{{ c.rows_with_position }} with a position. Labels per pair:
{% for k, n in c.labels_per_pair.items() %}{{ n }} {{ "pair" if n == 1 else "pairs" }} with {{ k }}
{{ "label" if k == "1" else "labels" }}{{ ", " if not loop.last }}{% endfor %}.</p>

<h2>Findings</h2>
{% if audit.findings %}<ul>{% for sentence in audit.findings %}<li>{{ sentence }}</li>{% endfor %}</ul>
{% else %}<p>No finding: no annotator stands out, no effect's interval excludes no effect, and no hygiene issue.</p>
{% endif %}
<p class="note">A bias effect is a finding only when its interval, widened for the {{ audit.bias.decision.effects }}
effects examined (Bonferroni, z = {{ "%.2f" | format(audit.bias.decision.z) }}), excludes no effect.</p>

<h2>Bias: what raises the odds of being chosen</h2>
{% if audit.bias.overall %}
<p>Bradley–Terry logits on the differences between the two answers (odds ratio [95% interval]; 1 is no effect).
The joint model holds the other features fixed. Where answers are known (a <code>gold</code> column), the joint model
is also fitted with the truth as one more term: what remains is what wins besides being right (a pool that rightly
prefers an honest "I don't know" to a fabrication shows a taste for hedging only until the truth is held fixed). It
holds the side of the truth fixed, not how clear it is: where annotators follow the truth on some kinds of pairs and
flip a coin on others, features that go with those kinds show in it too. The findings read the joint model.
{{ audit.bias.n }} labels.</p>
{% if images.forest %}{{ images.forest }}{% endif %}
{% set beyond = audit.bias.overall.given_gold or {} %}
<table>
<tr><th>Feature</th><th>alone</th><th>joint model</th><th>beyond the known answers</th></tr>
{% for key, words in audit.bias.features.items() if key != "position" %}
<tr><th>{{ words }}</th><td class="num">{{ audit.bias.overall.single.get(key) | odds }}</td>
<td class="num">{{ audit.bias.overall.joint.get(key) | odds }}</td>
<td class="num">{{ beyond.get(key) | odds }}</td></tr>
{% endfor %}
</table>
{% set pos = audit.bias.overall.position %}
<p>{% if pos %}The chosen answer was shown on the left in {{ pos.left_chosen }} of {{ pos.n }} labels
({{ pos.share | pct }}, 95% CI {{ pos.low | pct }} to {{ pos.high | pct }}).{% else %}No position column:
position bias is not measured.{% endif %}</p>
{% if audit.bias.annotators %}
<table>
<tr><th>Annotator</th><th>labels</th>
{% for key, words in audit.bias.features.items() if key not in ("position", "truth") %}<th>{{ words }}</th>{% endfor %}
<th>{{ audit.bias.features.position }}</th></tr>
{% for a in audit.bias.annotators %}
<tr><th>{{ a.annotator }}</th><td class="num">{{ a.n }}</td>
{% for key in audit.bias.features if key not in ("position", "truth") %}
<td class="num">{{ (a.joint or {}).get(key) | odds }}</td>{% endfor %}
<td class="num">{{ a.position.share | pct if a.position else "–" }}</td></tr>
{% endfor %}
</table>
<p class="note">Per annotator: the joint model's odds ratios, and the share of choices shown on the left; "–" with
fewer than {{ audit.min_labels }} labels or where a feature cannot be estimated.</p>
{% endif %}
{% else %}<p>No row has two different answers.</p>{% endif %}

<h2>Annotator reliability</h2>
{% set r = audit.reliability %}
{% if r.available %}
{% if images.accuracy %}{{ images.accuracy }}{% endif %}
{% for part in [r.dawid_skene, r.gold] if part.note %}<p class="note">{{ part.note }}.</p>{% endfor %}
<table>
<tr><th>Annotator</th><th>Dawid–Skene accuracy</th><th>accuracy on known answers</th><th>flagged</th></tr>
{% for row in reliability_rows %}
<tr><th>{{ row.annotator }}</th><td class="num">{{ row.dawid_skene | accuracy }}</td>
<td class="num">{{ row.gold | accuracy }}</td><td>{{ row.flags | join("; ") }}</td></tr>
{% endfor %}
</table>
{% else %}<p class="note">Not available: {{ r.note }}.</p>{% endif %}

<h2>Agreement</h2>
{% set g = audit.agreement %}
{% if g.available %}
<table>
<tr><th>Statistic</th><th>value</th><th>pairs</th><th>note</th></tr>
<tr><th>Raw agreement (share of agreeing couples; {{ g.raw.n_couples }} couples)</th>
<td class="num">{{ g.raw.value | pct }}</td><td class="num">{{ g.raw.n_pairs }}</td><td>{{ g.raw.note or "" }}</td></tr>
<tr><th>Fleiss' κ ({{ g.fleiss.raters_per_pair }} labels per pair)</th><td class="num">{{ g.fleiss.value | value }}</td>
<td class="num">{{ g.fleiss.n_pairs }}</td><td>{{ g.fleiss.note or "" }}</td></tr>
<tr><th>Krippendorff's α</th><td class="num">{{ g.krippendorff.value | value }}</td>
<td class="num">{{ g.krippendorff.n_pairs }}</td><td>{{ g.krippendorff.note or "" }}</td></tr>
</table>
{% if g.cohen %}
<table>
<tr><th>Annotators</th><th>Cohen's κ</th><th>shared pairs</th><th>note</th></tr>
{% for k in g.cohen %}<tr><td>{{ k.annotators | join(" and ") }}</td><td class="num">{{ k.kappa | value }}</td>
<td class="num">{{ k.n_shared }}</td><td>{{ k.note or "" }}</td></tr>{% endfor %}
</table>
{% endif %}
{% else %}<p class="note">Not available: {{ g.note }}.</p>{% endif %}

<h2>Hygiene</h2>
<table>
<tr><th>Issue</th><th>meaning</th><th>rows</th><th>first row numbers (1-based)</th></tr>
{% for name, issue in audit.hygiene.items() %}
<tr><th>{{ name }}</th><td>{{ issue.meaning }}</td><td class="num">{{ issue.count }}</td>
<td>{{ issue.rows | join(", ") }}</td></tr>
{% endfor %}
</table>
</body>
</html>
"""
