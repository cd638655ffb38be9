"""The audit of the lab's labelled pairs: its headline numbers for ``summary.json`` and its section of the report.

The preferences step audits every label it writes with ``posttrain audit``'s own function
(``instruments.audit.audit_rows``); the full audit is ``preferences/audit.json`` and ``preferences/audit.html``.
Here it is cut down to what the story needs: do the annotators agree, how often are they right, and what besides
the truth makes an answer win (the joint model, each feature holding the others fixed).
"""

from __future__ import annotations

from typing import Any

from posttrain.instruments.plots import DASH, esc, fmt

FEATURES = ("confident", "hedging", "length", "list_format", "markdown")


def odds(effect: dict | None) -> dict[str, float] | None:
    """An effect's odds ratio and its 95% interval (None when it could not be estimated)."""
    if effect is None:
        return None
    return {key: effect[key] for key in ("odds_ratio", "odds_ratio_low", "odds_ratio_high", "n")}


def audit_summary(audit: dict) -> dict[str, Any]:
    """The audit's headline numbers: agreement, accuracy against gold, flagged annotators, bias effects as odds
    ratios (joint, and beyond the known answers: the lab knows every pair's truth), the share of choices for the
    answer shown first, and the findings in words."""
    agreement, reliability, bias = audit["agreement"], audit["reliability"], audit["bias"]
    position, given_gold = bias["overall"]["position"], bias["overall"]["given_gold"]
    return {
        "raw_agreement": agreement["raw"]["value"] if agreement["available"] else None,
        "krippendorff_alpha": agreement["krippendorff"]["value"] if agreement["available"] else None,
        "overlapping_pairs": agreement["krippendorff"]["n_pairs"] if agreement["available"] else 0,
        "gold_accuracy_median": reliability["gold"]["median"] if reliability["available"] else None,
        "flagged": [row["annotator"] for row in reliability.get("flagged", [])],
        "joint_odds_ratios": {feature: odds(bias["overall"]["joint"][feature]) for feature in FEATURES},
        "beyond_gold_odds_ratios": None
        if given_gold is None
        else {f: odds(given_gold[f]) for f in (*FEATURES, "truth")},
        "left_share": None if position is None else position["share"],
        "findings": audit["findings"],
    }


def ratio_text(value: dict | None) -> str:
    if value is None:
        return DASH
    return f"{value['odds_ratio']:.2f} ({value['odds_ratio_low']:.2f} to {value['odds_ratio_high']:.2f})"


def audit_section(summary: dict) -> str:
    """(8) What the audit of the labels found, with a link to the full audit page."""
    audit = (summary.get("annotators") or {}).get("audit")
    head = "<h2>8. The labels, audited</h2>"
    if not audit:
        return head + "<p>No audit in this run.</p>"
    words = {"confident": "confident wording", "hedging": "hedging or “I don't know”",
             "length": "10 more words", "list_format": "a list", "markdown": "markdown formatting"}  # fmt: skip
    beyond = audit["beyond_gold_odds_ratios"] or dict.fromkeys(FEATURES)
    rows = "".join(
        f"<tr><td>{esc(words[f])}</td><td>{esc(ratio_text(audit['joint_odds_ratios'][f]))}</td>"
        f"<td>{esc(ratio_text(beyond[f]))}</td></tr>"
        for f in FEATURES
    )
    findings = "".join(f"<li>{esc(text)}</li>" for text in audit["findings"]) or "<li>No finding.</li>"
    return f"""{head}
<p>Every label above went through <code>posttrain audit</code>, the command any user can run on their own preference
data; the full page is <a href="preferences/audit.html">preferences/audit.html</a>. Annotators agree on
{esc(fmt(audit["raw_agreement"], "pct"))} of overlapping labels (Krippendorff's α
{esc(fmt(audit["krippendorff_alpha"], "num2"))} over {audit["overlapping_pairs"]} pairs labelled more than once);
the median annotator agrees with the gold preference {esc(fmt(audit["gold_accuracy_median"], "pct"))} of the time,
and chose the answer shown first {esc(fmt(audit["left_share"], "pct"))} of the time.</p>
<p>What makes an answer win, each feature holding the others fixed (odds ratio of being chosen, 95% interval; 1 means
no effect, above 1 the feature helps, below 1 it hurts). The lab knows which answer of each pair is truly better, so
the audit also fits the same model with the truth as one more term. A careful pool rightly prefers an honest “I don't
know” to a fabrication, which looks like a taste for hedging until the truth is held fixed. That second view holds the
side of the truth fixed, not how clear it is: the gold judge ranks a confident fabrication below a plain one, a
difference careful annotators do not see (both are wrong) and settle by a coin, so confident wording shows in it even
for them.</p>
<table><tr><th>the answer has</th><th>odds ratio</th><th>beyond being truly better</th></tr>{rows}</table>
<p>Findings:</p><ul>{findings}</ul>"""
