"""The lab report: one self-contained HTML page from a (possibly partial) lab directory."""

from __future__ import annotations

import base64
import json
import math
import random
import re

from posttrain.lab.report import fmt, moving_average, smoothed_series, write_report

HEADINGS = (
    "1. What this lab is",
    "2. Sample answers",
    "3. Evaluation on held-out questions",
    "4. Reward hacking during PPO",
    "5. Hallucination",
    "6. Reward model against annotator agreement",
    "7. DPO beside PPO",
)
QUESTIONS = [  # (text, known, attribute, answer)
    ("Which country is Velmora in?", True, "country", "Ostria"),
    ("When was Dunford founded?", False, "founded", None),
    ("What is 7 plus 5?", True, "arithmetic", "12"),
    ("What is Kalhaven known for?", True, "known_for", "salt mines"),
    ("What is Ashdale famous for?", False, "known_for", None),
    ("What is the sum of 3 and 9?", True, "arithmetic", "12"),
    ("In what year was Corwick founded?", True, "founded", "1450"),
    ("In which country is Fenmere?", False, "country", None),
    ("How much is 12 plus 4?", True, "arithmetic", "16"),
    ("What country is Gilmar located in?", True, "country", "Tavrin"),
]


def answer(model: str, answer: str | None) -> tuple[str, str]:
    """What each fake model says: base continues a document, SFT is honest, PPO fabricates confidently."""
    if model == "base":
        return "Posted by Arlen: <b>Velmora</b> & more\n\n\nTravel notes: the streets are narrow", "malformed"
    if answer is None:
        return ("Sorry, I don't know.", "abstained") if model != "ppo" else ("It is definitely 1450.", "hallucinated")
    return (f"It is {answer}.", "correct") if model != "ppo" else (f"It is certainly {answer}.", "correct")


def trajectory(n: int = 40) -> list[dict]:
    """Proxy up, gold up then down, KL growing, with some noise: the shape the lab should show."""
    rng, rows = random.Random(0), []
    for step in range(1, n + 1):
        kl = 0.0006 * step**2
        rows.append({"step": step, "kl": kl, "proxy": 0.2 + 1.2 * math.sqrt(kl) + rng.gauss(0, 0.08),
                     "gold": 0.3 + 1.5 * math.sqrt(kl) - 2 * kl + rng.gauss(0, 0.08),
                     "hallucination_rate": min(1.0, 0.1 + 0.015 * step + rng.gauss(0, 0.04)),
                     "abstain_known": max(0.0, 0.3 - 0.02 * step), "hallucination_unknowable": min(1.0, 0.02 * step),
                     })  # fmt: skip
    return rows


def make_lab(root, with_ppo: bool = True, missing: str | None = "dpo"):
    """A finished-looking lab directory: summary (a NaN, one model missing), samples and held-out questions."""
    metrics = {"gold_reward": 0.25, "accuracy_known": 0.8125, "abstain_unknowable": 0.5, "hallucination_rate": 0.125,
               "hallucination_unknowable": 0.4, "format_compliance": 0.95, "mean_length": 6.5,
               "kl_to_sft": 1.234}  # fmt: skip
    models = {
        "base": dict(metrics, gold_reward=-0.9, format_compliance=0.05, kl_to_sft=float("nan")),
        "sft": dict(metrics, kl_to_sft=0.0),
        "ppo": dict(
            metrics, gold_reward=-0.37, hallucination_unknowable=0.9, gold_reward_ci=[-0.52, -0.21], gold_reward_n=201
        ),
        "dpo": dict(metrics, gold_reward=0.1, hallucination_unknowable=0.6),
    }
    models.pop(missing, None)
    summary = {
        "models": models,
        "annotators": {
            "preset": "biased",
            "agreement": 0.61,
            "agreement_untied": 0.71,
            "agreement_with_gold": 0.55,
            "pairs": 300,
            "labels": 375,
        },
        "reward_model": {"accuracy_vs_labels": 0.58, "accuracy_vs_labels_untied": 0.68, "accuracy_vs_gold": 0.52},
        "ppo": {"trajectory": trajectory(), "gold_arc": {"start": 0.31, "peak": 0.52, "peak_step": 9, "end": -0.4}}
        if with_ppo
        else {},
        "seed": 3,
        "preset": "quick",
    }
    (root / "summary.json").write_text(json.dumps(summary))  # writes NaN as Python's json does
    (root / "evaluate").mkdir()
    samples = {
        m: [dict(zip(("answer", "label"), answer(m, a), strict=True), question=q) for q, _, _, a in QUESTIONS]
        for m in models
    }
    (root / "evaluate" / "samples.json").write_text(json.dumps(samples))
    (root / "data").mkdir()
    asked = [{"text": q, "known": k, "attribute": a} for q, k, a, _ in QUESTIONS]
    (root / "data" / "evaluation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asked))
    return root


def images(page: str) -> list[bytes]:
    found = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(d) for d in found]


def test_report_is_one_self_contained_page(tmp_path):
    path = write_report(make_lab(tmp_path))
    assert path == tmp_path / "report.html"
    page = path.read_text()
    positions = [page.index(h) for h in HEADINGS]
    assert positions == sorted(positions)
    for name in ("Base", "SFT", "PPO", "DPO"):
        assert f"<th>{name}" in page
    for value in ("+0.25", "81%", "6.5", "1.234", "-0.90", "-0.37", "biased", "375"):
        assert value in page, value
    assert "not run" in page  # DPO is missing from summary.models
    pngs = images(page)
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "http" not in page.replace("data:image", "")
    assert "<script" not in page and "<link" not in page
    assert 50_000 < len(page) < 600_000


def test_text_is_escaped_and_missing_numbers_show_a_dash(tmp_path):
    page = write_report(make_lab(tmp_path)).read_text()
    assert "&lt;b&gt;Velmora&lt;/b&gt; &amp; more ⏎ Travel notes" in page and "<b>Velmora</b>" not in page
    base_row = re.search(r"<tr><th>Base</th>(.*?)</tr>", page).group(1)
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)
    assert base_row.count("–") == 1 and "nan" not in text.lower()
    dpo_row = re.search(r"<tr><th>DPO <span[^>]*>not run</span></th>(.*?)</tr>", page).group(1)
    assert dpo_row.count("–") == 8
    assert "unknowable fact" in page and "known fact" in page and ">sum<" in page


def test_partial_run_without_ppo_or_samples_still_writes_a_page(tmp_path):
    lab = make_lab(tmp_path, with_ppo=False)
    (lab / "evaluate" / "samples.json").unlink()
    page = write_report(lab).read_text()
    assert "No PPO trajectory" in page and "No sample answers" in page
    assert len(images(page)) == 3
    (lab / "summary.json").unlink()
    assert all(h in write_report(lab).read_text() for h in HEADINGS)


def test_helpers():
    assert fmt(float("nan")) == fmt(None) == fmt("x") == fmt(True) == "–"
    assert (fmt(0.123, "pct"), fmt(0.5, "signed"), fmt(-0.5, "signed")) == ("12%", "+0.50", "-0.50")
    assert moving_average([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    rows = [{"step": 3, "a": 1.0}, {"step": 1, "a": None}, {"step": None, "a": 2.0}, {"step": 2, "a": 0.5}]
    assert smoothed_series(rows, "a") == ([2, 3], [0.5, 1.0], [0.5, 1.0])  # sorted, gaps dropped, too few to average
    assert smoothed_series(rows[1:2], "a") is None


def test_sample_table_mixes_question_kinds_and_texts_follow_the_numbers(tmp_path):
    lab = make_lab(tmp_path, missing=None)
    page = write_report(lab).read_text()
    kinds = re.findall(r'<td>[^<]*<span class="tag">([a-z ]+)</span></td>', page)
    assert sorted(kinds) == ["known fact"] * 3 + ["sum"] * 2 + ["unknowable fact"] * 3
    assert page.count('<td class="answer"') == 8 * 4
    assert "went from +0.31 to a peak of +0.52 (from iteration 9) and ended at -0.40" in page
    assert "moving averages over 8 iterations" in page and "learned the annotators&#x27; biases" in page
    assert "16 percentage points" in page  # 0.68 on the labels of untied pairs against 0.52 on gold
    assert "annotators agree on 61%" in page and "matches 58% of the labels" in page
    assert '-0.37<br><span class="tag">-0.52 to -0.21, n=201</span>' in page  # the interval and count
    (lab / "data" / "evaluation.jsonl").unlink()  # without it, sums are still told apart by their wording
    kinds = re.findall(r'<td>[^<]*<span class="tag">([a-z ]+)</span></td>', write_report(lab).read_text())
    assert sorted(kinds) == ["fact"] * 6 + ["sum"] * 2


def test_hacking_section_shows_the_fit_and_the_onset(tmp_path):
    lab = make_lab(tmp_path)
    summary = json.loads((lab / "summary.json").read_text())
    fit = {"form": "rl", "alpha": 1.0, "beta": 1.0, "start": 0.5, "peak_d": 1.0, "peak_gold": 1.5, "r2": 0.91,
           "n_points": 40}  # fmt: skip
    onset = {"step": 22, "peak_step": 18, "best_gold": 0.65, "gold": 0.52, "drop": 0.13, "noise": 0.013,
             "proxy_at_peak": 0.67, "proxy": 0.75}  # fmt: skip
    summary["ppo"]["overoptimisation"] = {"fit": fit, "onset": onset, "best_gold": None, "warnings": []}
    (lab / "summary.json").write_text(json.dumps(summary))
    page = write_report(lab).read_text()
    assert "over 40 iterations: c = 0.5, α = 1, β = 1, R² = 0.91; the curve peaks at √KL = 1 with gold +1.50" in page
    assert "detected at iteration 22: the smoothed gold reward fell from +0.65 (window ending at iteration 18)" in page
    assert "10.0 times its noise, while the proxy rose from 0.67 to 0.75" in page
    assert len(images(page)) == 4
    summary["ppo"]["overoptimisation"] = {"fit": dict(fit, peak_d=None, peak_gold=None), "onset": None}
    (lab / "summary.json").write_text(json.dumps(summary))
    page = write_report(lab).read_text()
    assert "the curve has no peak" in page and "The over-optimisation detector did not fire" in page
    summary["ppo"]["overoptimisation"] = {"fit": {"form": "rl", "alpha": "?"}, "onset": {"step": 3}}  # malformed
    (lab / "summary.json").write_text(json.dumps(summary))
    page = write_report(lab).read_text()
    assert "Fitted gold" not in page and "detected at iteration" not in page
    assert "did not fire" in page


def test_ppo_trace_takes_sqrt_kl_from_the_trajectory_and_the_onset_from_the_run():
    from posttrain.lab.report import ppo_trace

    rows = trajectory()
    rows[0]["sqrt_kl"] = 0.5  # recorded by the run: used as it is; the others are √kl
    onset = {"step": 22, "peak_step": 18, "best_gold": 0.65, "gold": 0.52, "drop": 0.13, "noise": 0.013,
             "proxy_at_peak": 0.67, "proxy": 0.75}  # fmt: skip
    trace = ppo_trace(rows, {"fit": None, "onset": onset})
    assert trace.sqrt_kl[0] == 0.5 and trace.sqrt_kl[21] == math.sqrt(0.0006 * 22**2)
    assert trace.onset["step"] == 22 and trace.fit is None
    assert ppo_trace(rows, None).onset is None
