"""What ``posttrain eval`` writes: the numbers (eval.json), every answer (answers.jsonl) and one
self-contained HTML page (eval.html: tables, a bar chart of the rates with their intervals and a
reliability diagram per model, as inline PNGs). The page is rendered by Jinja2 with autoescape:
every prompt, answer and name is text, never markup."""

from __future__ import annotations

import base64
import io
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from posttrain.ops.answer_rates import answer_rates
from posttrain.ops.calibration import calibration_summary

# rate -> (title, which way is better)
RATES = {
    "accuracy": ("Accuracy (answerable questions)", "↑"),
    "abstention": ("Abstention (unanswerable questions)", "↑"),
    "abstention_answerable": ("Abstention (answerable questions)", "↓"),
    "hallucination": ("Hallucination (all questions)", "↓"),
    "hallucination_unanswerable": ("Hallucination (unanswerable questions)", "↓"),
    "no_answer": ("Neither answer nor abstention (all questions)", "↓"),
}
TICKS = {"accuracy": "accuracy", "abstention": "abstention\n(unanswerable)", "abstention_answerable":
         "abstention\n(answerable)", "hallucination": "hallucination", "hallucination_unanswerable":
         "hallucination\n(unanswerable)", "no_answer": "no answer"}  # fmt: skip
ANSWERS_SHOWN = 200  # questions on the page; answers.jsonl holds them all


def question_counts(items: list) -> dict[str, int]:
    """How many questions of each kind: total, free_form, unanswerable, multiple_choice."""
    counts = {"total": len(items), "free_form": 0, "unanswerable": 0, "multiple_choice": 0}
    for question in items:
        counts[question.kind] += 1
    return counts


def model_summary(result, items: list, seed: int) -> dict[str, Any]:
    """One model's object in eval.json (keys in docs/eval.md)."""
    rates = answer_rates(result.outcomes, seed)
    stated = [i for i, o in enumerate(result.outcomes) if o.stated]  # calibration: every stated answer
    correct = np.array([result.outcomes[i].correct for i in stated], dtype=np.float64)  # (n,)
    # clipped: exp of a log-probability that rounding put a hair above 0 must stay a probability
    confidence = np.clip([result.outcomes[i].confidence for i in stated], 0.0, 1.0)  # (n,)
    per_token = np.clip([result.confidence_per_token[i] for i in stated], 0.0, 1.0)  # (n,)
    return {
        "name": result.name,
        "path": result.source,
        "questions": question_counts(items),
        "rates": {name: rates[name].as_dict() for name in RATES},
        "mean_length": rates["mean_length"].as_dict(),
        "calibration": calibration_summary(confidence, correct),
        "calibration_per_token": calibration_summary(per_token, correct),
        "kl_to_ref": result.kl_to_ref,
    }


def summary(config, items: list, results: list) -> dict[str, Any]:
    """eval.json: the data, the settings, and one object per model in the order given."""
    if config.abstention:
        abstention = f"function {config.abstention}"
    else:
        abstention = f"phrases from {config.abstention_phrases}" if config.abstention_phrases else "default phrases"
    settings = {"seed": config.seed, "max_new_tokens": config.max_new_tokens, "ref": config.ref or None,
                "kl_samples": config.kl_samples, "gold": config.gold or None, "abstention": abstention}  # fmt: skip
    return {
        "data": config.data,
        "questions": question_counts(items),
        "settings": settings,
        "models": [model_summary(r, items, config.seed) for r in results],
    }


def answer_rows(items: list, results: list) -> list[dict[str, Any]]:
    """answers.jsonl: per question its prompt, key and every model's answer, outcome and confidence."""
    rows = []
    for i, question in enumerate(items):
        answers = {}
        for result in results:
            outcome = result.outcomes[i]
            answers[result.name] = {"response": result.responses[i], "choice": result.picks[i],
                                    "outcome": outcome.label, "confidence": outcome.confidence,
                                    "confidence_per_token": result.confidence_per_token[i],
                                    "length": outcome.length}  # fmt: skip
        rows.append({"row": question.row, "kind": question.kind, "prompt": question.prompt,
                     "accepted": list(question.accepted) or None, "choices": list(question.choices) or None,
                     "right_choice": question.right_choice, "models": answers})  # fmt: skip
    return rows


def png(figure: Figure) -> str:
    """The figure as a base64 PNG, for an inline ``data:`` image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def rates_figure(models: list[dict]) -> str:
    """Grouped bars: one group per rate, one bar per model, whiskers at the 95% interval."""
    figure = Figure(figsize=(10, 4))
    ax = figure.subplots()
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        x, heights, errors = [], [], [[], []]
        for r, name in enumerate(RATES):
            rate = model["rates"][name]
            if rate["value"] is None:  # no question of that kind
                continue
            x.append(r - 0.4 + width * (m + 0.5))
            heights.append(rate["value"])
            errors[0].append(rate["value"] - rate["ci_low"])
            errors[1].append(rate["ci_high"] - rate["value"])
        ax.bar(x, heights, width, yerr=errors, capsize=3, label=model["name"])
    ax.set_xticks(range(len(RATES)), [TICKS[name] for name in RATES], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="share of questions")
    ax.legend(fontsize=8)
    return png(figure)


def reliability_figure(model: dict) -> str:
    """Accuracy against confidence in 15 equal-width bins; the diagonal is perfect calibration."""
    figure = Figure(figsize=(4, 4))
    ax = figure.subplots()
    bins = [b for b in model["calibration"]["bins"] if b["count"]]
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], [b["upper"] - b["lower"] for b in bins],
           align="edge", edgecolor="black", alpha=0.7, label="accuracy")  # fmt: skip
    ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black", markersize=3,
            label="mean confidence of the bin")  # fmt: skip
    ece = model["calibration"]["ece"]
    title = f"{model['name']}: ECE {ece:.3f}" if ece is not None else f"{model['name']}: no stated answer"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(fontsize=7, loc="upper left")
    return png(figure)


def percent(rate: dict | None) -> str:
    if rate is None or rate["value"] is None:
        return "n/a"
    return f"{100 * rate['value']:.1f}% [{100 * rate['ci_low']:.1f}, {100 * rate['ci_high']:.1f}] (n={rate['n']})"


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def prompt_text(prompt: str | list[dict]) -> str:
    """A chat prompt as "role: content" lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def key_text(row: dict) -> str:
    """What counts as right: the accepted answers, the right choice, or nothing (unanswerable / --gold)."""
    if row["choices"]:
        return f"{row['choices'][row['right_choice']]} (of: {' | '.join(row['choices'])})"
    if row["accepted"]:
        return " | ".join(row["accepted"])
    return "(unanswerable)" if row["kind"] == "unanswerable" else "(judged by --gold)"


def html_page(report: dict, rows: list[dict]) -> str:
    """eval.html, self-contained, every text escaped."""
    from posttrain.instruments.eval_template import TEMPLATE

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(percent=percent, number=number, prompt_text=prompt_text, key_text=key_text)
    models = report["models"]
    return environment.from_string(TEMPLATE).render(
        report=report, models=models, rates=RATES, rows=rows[:ANSWERS_SHOWN], n_rows=len(rows),
        rates_png=rates_figure(models), reliability_pngs=[reliability_figure(m) for m in models],
    )  # fmt: skip
