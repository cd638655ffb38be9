"""``report.html`` of a lab experiment: its question, its figure and its table of figures over seeds.

Every number comes from ``experiment.json`` (``lab/experiments.py``); each figure is a mean over
the seeds with its 95% t-interval when there are two seeds or more. Text is escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from posttrain.instruments.plots import CSS, Trace, cycle, esc, figure_png, fit_from, fmt, hacking_figure

QUESTIONS = {
    "kl-sweep": "How does the KL penalty shape reward hacking? PPO from the same SFT model and reward model at "
    "several KL coefficients: the gold and the proxy reward against √KL (Gao, Schulman, Hilton 2022), with "
    "their RL form, R(d) = d(α − β ln d), fitted per arm.",
    "frontier": "Which method buys more gold reward per nat of KL to SFT? Each DPO and PPO model's gold reward "
    "on the held-out questions against its KL to the SFT model (Rafailov et al. 2023, figure 2).",
    "labels": "At a fixed labelling budget, careful few or hurried many? Annotator pools of different care (biased: "
    "hurried and swayed by confident wording; careful: checks the facts, at three times the price per label; a mix "
    "of both), each at several total budgets: how often the labels bought agree with the truth, how often the "
    "reward model trained on them does, and the gold reward of PPO against it.",
    "mitigations": "What keeps a policy from hacking a biased reward model? PPO with one reward model, an "
    "ensemble with conservative aggregation (Coste et al. 2023), a larger KL coefficient, and stopping when the "
    "gold monitor sees the gold reward fall.",
    "calibration": "Does RLHF degrade calibration here, as the GPT-4 technical report measured? The probability "
    "each model gives its greedy answer against whether the answer is right, on the known questions it answers.",
}
PPO_COLUMNS = (("gold_peak", "gold, peak (rollouts)", "signed"), ("gold_end", "gold, last quarter", "signed"),
               ("gold_drop", "gold drop from the peak", "signed"), ("proxy_end", "proxy, last quarter", "g"),
               ("sqrt_kl_end", "√KL, last quarter", "num3"), ("invention_end", "invents on unknowable", "pct"),
               ("held_out_gold", "held-out gold", "signed"), ("held_out_kl", "held-out KL to SFT", "num3"),
               ("fit_peak_sqrt_kl", "fitted peak √KL", "num3"), ("iterations", "iterations", "num1"))  # fmt: skip


def figure_text(figure: dict[str, Any] | None, kind: str) -> str:
    """ "mean (low to high)", or the mean alone for one seed, or a dash."""
    if not figure or figure.get("mean") is None:
        return "–"
    text, interval = fmt(figure["mean"], kind), figure.get("ci")
    return text if interval is None else f"{text} ({fmt(interval[0], kind)} to {fmt(interval[1], kind)})"


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def ppo_section(summary: dict) -> str:
    """The hacking figure of every PPO arm (first seed), and each arm's figures over seeds."""
    arms, figures = summary["arms"], summary["figures"]["arms"]
    traces = []
    for name in figures:
        ppo = summary["results"][name][0]["ppo"]
        rows = ppo["trajectory"]
        traces.append(Trace(arms[name]["label"], [r["step"] for r in rows], [r["sqrt_kl"] for r in rows],
                            [r["proxy"] for r in rows], [r["gold"] for r in rows],
                            fit_from(ppo["overoptimisation"]["fit"])))  # fmt: skip
    rows = [[arms[name]["label"], *(figure_text(figures[name][key], kind) for key, _, kind in PPO_COLUMNS)]
            for name in figures]  # fmt: skip
    best = summary["figures"]["best"]
    note = (f"Highest gold peak: {arms[best['arm']]['label']}, at iteration(s) "
            f"{', '.join(map(str, best['peak_step']))} (one per seed).")  # fmt: skip
    return (figure_png(hacking_figure(traces, reference="SFT")) + f"<p>{esc(note)}</p>"
            + table(["arm", *(title for _, title, _ in PPO_COLUMNS)], rows))  # fmt: skip


LABEL_COLUMNS = (("cost", "cost spent", "num1"), ("labels", "labels", "num1"), ("pairs", "pairs", "num1"),
                 ("labels_vs_gold", "labels agree with gold", "pct"),
                 ("rm_vs_gold_train", "reward model vs gold, training questions", "pct"),
                 ("rm_vs_gold", "reward model vs gold, held-out", "pct"),
                 ("rm_vs_labels", "reward model vs its labels, held-out", "pct"),
                 ("gold_peak", "PPO gold, peak", "signed"), ("gold_end", "PPO gold, last quarter", "signed"),
                 ("proxy_end", "proxy, last quarter", "g"),
                 ("invention_end", "invents on unknowable", "pct"))  # fmt: skip


def labels_section(summary: dict) -> str:
    """Per pool, against the budget: the reward model's accuracy against the truth, and PPO's peak and final gold
    (means over seeds with their t-intervals); then every arm's figures."""
    figures, pools, arms = summary["figures"]["arms"], summary["figures"]["pools"], summary["arms"]
    fig = Figure(figsize=(11, 3.8))
    panels = fig.subplots(1, 3)
    keys = (("rm_vs_gold_train", "reward model vs gold (training questions)"), ("gold_peak", "PPO gold, peak"),
            ("gold_end", "PPO gold, last quarter"))  # fmt: skip
    names_of = {pool: [n for n, (p, _) in pools.items() if p == pool] for pool, _ in pools.values()}
    budgets = sorted({b for _, b in pools.values()})
    for ax, (key, title) in zip(panels, keys, strict=True):
        for i, ((pool, names), colour) in enumerate(zip(names_of.items(), cycle(len(names_of)), strict=True)):
            xs = [pools[n][1] * 1.04 ** (i - 1) for n in names]  # side by side, so the intervals do not hide each other
            means = [np.nan if figures[n][key]["mean"] is None else figures[n][key]["mean"] for n in names]
            ax.plot(xs, means, "o-", color=colour, label=pool)
            for x, n in zip(xs, names, strict=True):
                if figures[n][key]["ci"]:
                    ax.plot([x, x], figures[n][key]["ci"], color=colour, lw=1, alpha=0.6)
        ax.set(title=title, xlabel="budget (hurried labels)", xscale="log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
    panels[0].legend(frameon=False)
    fig.tight_layout()
    best = summary["figures"]["best"]
    winners = {budget: {key: pool or "–" for key, pool in b.items()} for budget, b in best.items()}
    note = " ".join(f"At budget {budget}: the reward model closest to the truth came from the {b['rm_vs_gold_train']} "
                    f"pool, the highest PPO gold peak from the {b['gold_peak']} pool, the most gold at the end from "
                    f"the {b['gold_end']} pool." for budget, b in winners.items())  # fmt: skip
    rows = [[arms[n]["label"], *(figure_text(figures[n][key], kind) for key, _, kind in LABEL_COLUMNS)]
            for n in figures]  # fmt: skip
    return (figure_png(fig) + f"<p>{esc(note)}</p>"
            + table(["arm", *(title for _, title, _ in LABEL_COLUMNS)], rows))  # fmt: skip


def frontier_section(summary: dict) -> str:
    """Gold against KL for SFT, the PPO arms and the DPO arms: every seed's model faint, the means over seeds
    joined (the intervals are in the table: over three seeds they are too wide to draw)."""
    points, arms = summary["figures"]["points"], summary["arms"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    families = {"PPO": [n for n in points if n.startswith("ppo")], "DPO": [n for n in points if n.startswith("dpo")]}
    for (family, names), colour in zip(families.items(), cycle(2), strict=True):
        for n in names:
            ax.scatter(points[n]["kl"]["values"], points[n]["gold"]["values"], s=14, color=colour, alpha=0.3)
        xs = [points[n]["kl"]["mean"] for n in names]
        ys = [points[n]["gold"]["mean"] for n in names]
        ax.plot(xs, ys, "o-", color=colour, label=f"{family}, mean over seeds")
        for n, x, y in zip(names, xs, ys, strict=True):
            ax.annotate(arms[n]["label"].split(", ")[-1], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    sft = points["sft"]
    ax.plot([0], [sft["gold"]["mean"]], "k*", markersize=10, label="SFT")
    ax.set_xscale("symlog", linthresh=1.0)  # KL from 0 (SFT) to tens of nats
    ax.set(xlabel="KL to SFT on the evaluation set (nats, log scale above 1)", ylabel="held-out gold reward")
    ax.legend(frameon=False)
    label = {"sft": "SFT", **{n: a["label"] for n, a in arms.items()}}
    rows = [[label[n], figure_text(p["kl"], "num3"), figure_text(p["gold"], "signed")] for n, p in points.items()]
    return figure_png(fig) + table(["model", "KL to SFT (nats)", "held-out gold"], rows)


def calibration_section(summary: dict) -> str:
    """A reliability diagram per model for the multiple-choice reading (seeds pooled), and ECE, Brier and
    accuracy over seeds for both readings of confidence."""
    models = summary["figures"]["models"]
    fig = Figure(figsize=(4 * len(models), 3.8))
    for ax, (name, figures) in zip(np.atleast_1d(fig.subplots(1, len(models))), models.items(), strict=True):
        bins = [b for b in figures["bins_choice"] if b["count"]]
        centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width=1 / max(len(figures["bins_choice"]), 1), alpha=0.6,
               edgecolor="#333333")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{name.upper()}: ECE {figure_text(figures['ece_choice'], 'num3')}", xlim=(0, 1), ylim=(0, 1),
               xlabel="confidence (multiple choice)", ylabel="accuracy")  # fmt: skip
    fig.tight_layout()
    rows = [[name.upper(), figure_text(f["ece_choice"], "num3"), figure_text(f["brier_choice"], "num3"),
             figure_text(f["accuracy_choice"], "pct"), figure_text(f["ece"], "num3"), figure_text(f["brier"], "num3"),
             figure_text(f["answered"], "num1")] for name, f in models.items()]  # fmt: skip
    header = ["model", "ECE, multiple choice", "Brier, multiple choice", "accuracy, multiple choice",
              "ECE, greedy answer", "Brier, greedy answer", "known questions answered"]  # fmt: skip
    note = ("Multiple choice: every value of the fact's attribute in one fixed phrasing, the pick the likeliest, its "
            "confidence the softmax over the choices (as the GPT-4 report reads MMLU). Greedy answer: the probability "
            "of the answer the model wrote, on the known questions where it stated a value.")  # fmt: skip
    return figure_png(fig) + f"<p>{esc(note)}</p>" + table(header, rows)


SECTIONS = {"kl-sweep": ppo_section, "mitigations": ppo_section, "frontier": frontier_section,
            "labels": labels_section, "calibration": calibration_section}  # fmt: skip


def time_rows(summary: dict) -> list[list[str]]:
    """Seconds each arm's own steps took, per seed."""
    return [[summary["arms"][name]["label"], ", ".join(fmt(r["seconds"], "num1") for r in per_seed)]
            for name, per_seed in summary["results"].items()]  # fmt: skip


def write_report(output: Path, summary: dict) -> Path:
    name = summary["experiment"]
    seeds = ", ".join(map(str, summary["seeds"]))
    title = f"posttrain lab experiment: {name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head>
<body><h1>{esc(title)}</h1><p class="sub">{esc(f"preset {summary['preset']}, seeds {seeds}")}</p>
<p>{esc(QUESTIONS[name])}</p>
<p>Each figure is the mean over the seeds, with its 95% t-interval in brackets when there are two seeds or more.</p>
{SECTIONS[name](summary)}
<h2>Time</h2><p>Seconds of each arm's own steps, per seed (the trunk holds the steps every arm shares).</p>
{table(["arm", "seconds"], time_rows(summary))}
</body></html>
"""
    path = Path(output) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
