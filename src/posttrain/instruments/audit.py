"""``posttrain audit``: an audit of pairwise preference data: do the annotators agree, who is reliable,
what do they prefer besides quality, and is the data clean?

Reads any preference data posttrain reads (TRL's ``prompt``/``chosen``/``rejected`` rows, one row per
label; ``annotator_id``, ``pair_id``, ``position`` and ``gold`` are used when present) and writes
OUTPUT/audit.json and OUTPUT/audit.html, only once everything has been computed (bad input writes
nothing). The statistics are the tested functions of ``posttrain.ops.agreement`` and
``posttrain.ops.preference_bias``; this module groups the rows into pairs, runs them, and keeps the
results as plain JSON. ``audit_report`` turns them into findings, plots and the page. docs/audit.md
describes every key.

Pairs: rows with the same ``pair_id`` (and the same prompt and answers), or without ``pair_id`` the
same prompt and the same two answers in either order. Within a pair side 0 is the answer whose text
sorts first, so that a label is 0 or 1 whatever the order the row lists them in.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posttrain import config as config_io
from posttrain.config import option, require
from posttrain.errors import UserError

MIN_PAIRS = 5  # pairs with two or more labels that κ, α and Dawid–Skene need (the agreement ops' default)
MIN_LABELS = 20  # an annotator's bias effects need this many labels (``preference_bias.MIN_LABELS``)
FINDINGS_ALPHA = 0.05  # family-wise error rate of the bias findings (Bonferroni over every effect examined)
FIRST_ROWS = 10  # row numbers kept per hygiene issue
NO_ANNOTATOR = "no annotator_id column"
FEATURE_WORDS = {
    "length": "longer answer (per 10 words)",
    "confident": "confident wording",
    "hedging": "hedging or 'I don't know'",
    "list_format": "lists",
    "markdown": "markdown formatting",
    "position": "shown on the left",
    "truth": "the truly better answer (known answers)",
}
HYGIENE_MEANING = {
    "duplicate": "same annotator, prompt and answers as an earlier row (in either order)",
    "contradictory": "same annotator, prompt and answers as an earlier row, chosen and rejected swapped",
    "identical": "chosen and rejected are the same text",
    "empty": "empty prompt, chosen or rejected",
    "truncated": "an answer of 20 words or more stops mid-sentence",
    "pair_id_reused": "a pair_id seen earlier with a different prompt or answers (kept as another pair)",
    "gold_conflict": "a known answer that contradicts an earlier row of the same pair (the first one is used)",
}


@dataclass
class AuditConfig:
    data: str = option("", "preference data: a .jsonl/.json/.parquet/.csv file or a hub id (see docs/audit.md)")
    output: str = option("", "output directory (audit.json, audit.html)")
    seed: int = option(0, "seed of the random orientation of the pairs in the bias models")
    min_labels: int = option(MIN_LABELS, "an annotator's bias effects need at least this many labels")
    overwrite: bool = option(False, "replace a non-empty OUTPUT")

    def validate(self) -> None:
        for name in ("data", "output"):
            if not getattr(self, name):
                raise UserError(f"{config_io.flag(name)} is required (or set `{name}:` in the config file)")
        require(self, "seed", self.seed >= 0, "non-negative")
        require(self, "min_labels", self.min_labels >= 1, "at least 1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_io.add_arguments(parser, AuditConfig)


def run(args: argparse.Namespace) -> None:
    from posttrain.instruments.evaluate import publish

    config = config_io.resolve(AuditConfig, args)
    output = check_output(config, args.config)
    audit = audit_rows(read_rows(config.data), config.data, config.seed, min_labels=config.min_labels)
    publish(output, config.output, render_files(audit))
    print(f"wrote {output / 'audit.html'} (numbers in {output / 'audit.json'})")


def check_output(config: AuditConfig, config_file: str | None) -> Path:
    """OUTPUT is not the data (nor the config file), and is empty unless --overwrite."""
    from posttrain.training.output import check_report_dir

    inputs = [("--data", config.data)] + ([("--config", config_file)] if config_file else [])
    return check_report_dir(config.output, inputs, config.overwrite)


def read_rows(source: str) -> list[dict]:
    """The rows of --data, read as every posttrain command reads data."""
    from posttrain.data.loading import load_rows

    try:
        return load_rows(source).to_list()
    except UserError as err:
        raise UserError(f"--data {err}") from err


def render_files(audit: dict) -> dict[str, str]:
    """audit.json and audit.html as text (JSON without NaN: a missing value is null)."""
    from posttrain.instruments.audit_report import html_page

    return {"audit.json": json.dumps(audit, indent=2, allow_nan=False) + "\n", "audit.html": html_page(audit)}


def write_audit(audit: dict, output: Path) -> None:
    """Write audit.json and audit.html into the existing directory ``output`` (both rendered before either
    is written)."""
    for name, text in render_files(audit).items():
        (Path(output) / name).write_text(text, encoding="utf-8")


def audit_rows(rows: list[dict], source: str, seed: int = 0, *, min_labels: int = MIN_LABELS) -> dict:
    """The audit of preference rows as a JSON-able dict (keys in docs/audit.md). ``source`` names the data
    in errors ("SOURCE: row 3, field 'gold': ...") and in the report; ``seed`` orients the pairs of the
    bias models."""
    from posttrain.instruments.audit_report import findings
    from posttrain.ops.preference_bias import parse_rows

    if not rows:
        raise UserError(f"{source}: no rows")
    try:
        pairs = parse_rows(rows)
    except UserError as err:
        raise UserError(f"{source}: {err}") from err
    grouped = group_labels(pairs)
    audit = {
        "source": source,
        "seed": seed,
        "min_labels": min_labels,
        "counts": counts(pairs, grouped),
        "agreement": agreement_section(grouped),
        "reliability": reliability_section(grouped, min_labels),
        "bias": bias_section(pairs, seed, min_labels),
        "hygiene": hygiene_section(pairs, grouped),
    }
    audit = json_safe(audit)
    audit["findings"] = findings(audit)
    return audit


# --- pairs and labels ---------------------------------------------------------------------------


@dataclass
class Grouped:
    """The rows grouped into pairs: each row's pair key, the labels of the rows with an annotator in
    canonical sides (None when there are none), the known better side of each pair (0 or 1) and the
    rows with a pair_id or gold conflict."""

    keys: list[tuple]
    labels: Any  # agreement.Labels | None
    gold: dict[Hashable, int]
    has_annotators: bool
    issues: dict[str, list[int]] = field(default_factory=lambda: {"pair_id_reused": [], "gold_conflict": []})


def group_labels(pairs: list) -> Grouped:
    """Pair keys, canonical labels (0: the chosen answer is the one whose text sorts first) and gold. A
    row whose answers are identical has no side to choose and gives no label; an annotator's repeat of a
    pair (a hygiene duplicate) is left out after its first label."""
    from posttrain.ops.agreement import make_labels

    grouped = Grouped([], None, {}, any(p.annotator is not None for p in pairs))
    content_of_id: dict[str, tuple] = {}
    pair_ids, annotators, choices, seen = [], [], [], set()
    for p in pairs:
        first, second = sorted((p.chosen, p.rejected))
        content = (p.prompt_key, first, second)
        key = ("content", *content) if p.pair_id is None else ("pair_id", p.pair_id, *content)
        if p.pair_id is not None and content_of_id.setdefault(p.pair_id, content) != content:
            grouped.issues["pair_id_reused"].append(p.row)
        grouped.keys.append(key)
        if first.strip() == second.strip():
            continue
        if p.gold is not None:
            truth = int((p.chosen if p.gold == "chosen" else p.rejected) != first)
            if grouped.gold.setdefault(key, truth) != truth:
                grouped.issues["gold_conflict"].append(p.row)
        if p.annotator is not None and (key, p.annotator) not in seen:
            seen.add((key, p.annotator))
            pair_ids.append(key)
            annotators.append(p.annotator)
            choices.append(int(p.chosen != first))
    grouped.labels = make_labels(pair_ids, annotators, choices) if choices else None
    return grouped


def counts(pairs: list, grouped: Grouped) -> dict[str, Any]:
    per_pair = Counter(Counter(grouped.keys).values())  # labels per pair -> number of pairs
    return {
        "rows": len(pairs),
        "pairs": len(set(grouped.keys)),
        "annotators": len({p.annotator for p in pairs if p.annotator is not None}),
        "rows_without_annotator": sum(p.annotator is None for p in pairs),
        "rows_with_gold": sum(p.gold is not None for p in pairs),
        "rows_with_position": sum(p.position is not None for p in pairs),
        "labels_per_pair": {str(k): per_pair[k] for k in sorted(per_pair)},
    }


# --- agreement and reliability ------------------------------------------------------------------


def finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def shortfall(
    name: str, value: float | None, n_pairs: int, min_pairs: int, which: str = "with 2 or more labels"
) -> str | None:
    """Why a statistic has no value: too few pairs (the count found), or every label on one side."""
    if value is None:
        return f"{name} needs {min_pairs} {'pair' if min_pairs == 1 else 'pairs'} {which}; the data has {n_pairs}"
    if math.isnan(value):
        return f"{name} is undefined: every label chose the same side"
    return None


def unavailable(grouped: Grouped) -> str:
    return NO_ANNOTATOR if not grouped.has_annotators else "no labelled pair has two different answers"


def agreement_section(grouped: Grouped) -> dict[str, Any]:
    """Raw agreement, Cohen's κ per couple of annotators, Fleiss' κ and Krippendorff's α, each with its n."""
    from posttrain.ops import agreement as ag

    if grouped.labels is None:
        return {"available": False, "note": unavailable(grouped), "raw": None, "cohen": [], "fleiss": None,
                "krippendorff": None}  # fmt: skip
    labels = grouped.labels
    raw = ag.raw_agreement(labels)
    fleiss = ag.fleiss_kappa(labels, MIN_PAIRS)
    alpha = ag.krippendorff_alpha(labels, MIN_PAIRS)
    cohen = []
    for (a, b), (kappa, shared) in ag.cohen_kappa_by_pair(labels, MIN_PAIRS).items():
        note = shortfall("Cohen's kappa", kappa, shared, MIN_PAIRS, "labelled by both")
        cohen.append({"annotators": [a, b], "kappa": finite(kappa), "n_shared": shared, "note": note})
    same = "with the same number (2 or more) of labels"
    return {
        "available": True,
        "note": None,
        "raw": {
            "value": finite(raw.value),
            "n_pairs": raw.n_pairs,
            "n_couples": raw.n_couples,
            "note": shortfall("Raw agreement", raw.value, raw.n_pairs, 1),
        },
        "cohen": cohen,
        "fleiss": {
            "value": finite(fleiss.value),
            "n_pairs": fleiss.n_pairs,
            "raters_per_pair": fleiss.raters_per_pair,
            "note": shortfall("Fleiss' kappa", fleiss.value, fleiss.n_pairs, MIN_PAIRS, same),
        },
        "krippendorff": {
            "value": finite(alpha.value),
            "n_pairs": alpha.n_pairs,
            "note": shortfall("Krippendorff's alpha", alpha.value, alpha.n_pairs, MIN_PAIRS),
        },
    }


def accuracy_rows(accuracies: list) -> list[dict[str, Any]]:
    return [{"annotator": a.annotator, "accuracy": a.accuracy, "low": a.low, "high": a.high, "n": a.n}
            for a in accuracies]  # fmt: skip


def flagged(accuracies: list, by: str, min_labels: int) -> list[dict[str, Any]]:
    """``flag_unreliable``'s annotators among those with at least ``min_labels`` labels (a median of a few
    labels each is itself noise), with the numbers behind the verdict and the reason in words."""
    from posttrain.ops.agreement import flag_unreliable

    accuracies = [a for a in accuracies if a.n >= min_labels]
    known = [a for a in accuracies if a.accuracy is not None]
    median = float(np.median([a.accuracy for a in known])) if known else None
    what = "accuracy on the known answers" if by == "gold" else "accuracy estimated by Dawid–Skene"
    out = []
    for name in flag_unreliable(accuracies):
        a = next(acc for acc in accuracies if acc.annotator == name)
        reason = (f"{what} {a.accuracy:.0%} (95% CI {a.low:.0%} to {a.high:.0%}, n = {a.n}): even the top of the "
                  f"interval is more than 10 points below the pool's median {median:.0%}")  # fmt: skip
        out.append({"annotator": name, "by": by, "accuracy": a.accuracy, "low": a.low, "high": a.high, "n": a.n,
                    "median": median, "reason": reason})  # fmt: skip
    return out


def reliability_section(grouped: Grouped, min_labels: int) -> dict[str, Any]:
    """Dawid–Skene accuracy per annotator (needs ``MIN_PAIRS`` pairs with 2+ labels), accuracy on the known
    answers with Wilson intervals (needs gold), and the annotators flagged by either (``flagged``)."""
    from posttrain.ops import agreement as ag

    labels = grouped.labels
    if labels is None:
        note = unavailable(grouped)
        return {"available": False, "note": note, "dawid_skene": None, "gold": None, "flagged": []}
    overlapping = ag.raw_agreement(labels).n_pairs
    dawid_skene = {"available": False, "note": shortfall("Dawid–Skene", None, overlapping, MIN_PAIRS),
                   "annotators": [], "iterations": None, "converged": None}  # fmt: skip
    flags = []
    if overlapping >= MIN_PAIRS:
        fit = ag.dawid_skene(labels)
        dawid_skene = {"available": True, "note": None, "annotators": accuracy_rows(fit.accuracy),
                       "iterations": fit.iterations, "converged": fit.converged}  # fmt: skip
        flags += flagged(fit.accuracy, "dawid_skene", min_labels)
    on_gold = [key for key in labels.pairs if key in grouped.gold]
    gold = {"available": False, "note": "no labelled pair has a known answer (gold)", "annotators": [], "median": None}
    if on_gold:
        accuracies = ag.accuracy_on_gold(labels, grouped.gold)
        known = [a.accuracy for a in accuracies if a.accuracy is not None]
        gold = {"available": True, "note": None, "annotators": accuracy_rows(accuracies),
                "median": float(np.median(known))}  # fmt: skip
        flags = flagged(accuracies, "gold", min_labels) + flags
    return {"available": True, "note": None, "dawid_skene": dawid_skene, "gold": gold, "flagged": flags}


# --- bias and hygiene ---------------------------------------------------------------------------


def effects(fitted: dict | None) -> dict[str, Any] | None:
    if fitted is None:
        return None
    return {name: None if e is None else {"name": FEATURE_WORDS[name], **asdict(e)} for name, e in fitted.items()}


def effects_group(single: dict | None, joint: dict | None, position: Any, given_gold: dict | None = None) -> dict:
    """One group's one-feature effects, joint effects, position bias and effects beyond the known answers
    (``preference_bias.truth_probe``; None without enough rows with gold), as JSON-able dicts."""
    return {
        "single": effects(single),
        "joint": effects(joint),
        "position": None if position is None else asdict(position),
        "given_gold": effects(given_gold),
    }


def examined_in(group: dict) -> int:
    """The effects of one group that the findings test: the joint model's features and position."""
    return sum(value is not None for value in [*(group["joint"] or {}).values(), group["position"]])


def given_gold(pairs: list, seed: int, min_labels: int) -> dict | None:
    """``truth_probe`` when at least ``min_labels`` of the pairs have a known answer, else None."""
    from posttrain.ops.preference_bias import truth_probe

    return truth_probe(pairs, seed) if sum(p.gold is not None for p in pairs) >= min_labels else None


def bias_section(pairs: list, seed: int, min_labels: int) -> dict[str, Any]:
    """One-feature and joint effects and position bias, for the pool and each annotator, over the rows whose
    answers differ, and the effects beyond the known answers for each group with ``min_labels`` rows with
    gold; ``decision``: how many effects the findings examine and the z their intervals use."""
    from scipy.stats import norm

    from posttrain.ops import preference_bias as pb

    usable = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
    section: dict[str, Any] = {"n": len(usable), "features": FEATURE_WORDS, "overall": None, "annotators": []}
    if usable:
        overall = (pb.bias_probes(usable, seed), pb.joint_probe(usable, seed), pb.position_bias(usable))
        section["overall"] = effects_group(*overall, given_gold(usable, seed, min_labels))
        for probe in pb.per_annotator(usable, seed, min_labels):
            mine = [p for p in usable if p.annotator == probe.annotator] if probe.joint is not None else []
            group = effects_group(probe.effects, probe.joint, probe.position, given_gold(mine, seed, min_labels))
            section["annotators"].append({"annotator": probe.annotator, "n": probe.n, **group})
    groups = ([section["overall"]] if section["overall"] else []) + section["annotators"]
    examined = sum(examined_in(group) for group in groups)
    z = float(norm.ppf(1 - FINDINGS_ALPHA / (2 * max(examined, 1))))
    section["decision"] = {"effects": examined, "family_alpha": FINDINGS_ALPHA, "z": z}
    return section


def hygiene_section(pairs: list, grouped: Grouped) -> dict[str, dict[str, Any]]:
    from posttrain.ops.preference_bias import hygiene

    issues = {name: (issue.count, list(issue.rows)) for name, issue in hygiene(pairs).items()}
    issues |= {name: (len(rows), rows[:FIRST_ROWS]) for name, rows in grouped.issues.items()}
    return {name: {"count": n, "rows": rows, "meaning": HYGIENE_MEANING[name]} for name, (n, rows) in issues.items()}


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy numbers as Python numbers, NaN and infinities as None, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value
