"""``posttrain audit`` on preference files built here with planted effects: unreliable annotators, length,
position and hedging biases, a clean pool, hygiene problems, bad input, and an escaped page."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.instruments.audit import audit_rows, write_audit
from posttrain.ops.preference_bias import FEATURES, answer_features

SEEDS = range(5)
# Neutral words: none is a confident, hedging, list or markdown marker.
WORDS = "the river town trades wool and salt along an old road near green hills where farmers grow barley".split()


@dataclass(frozen=True)
class Rater:
    """A simulated annotator: logit P(choose answer a) = skill·(+1 if a is truly better else −1)
    + length·Δ(words / 10) + hedging·Δhedging + left·(+1 if a is shown on the left else −1)."""

    skill: float = 0.0
    length: float = 0.0
    hedging: float = 0.0
    left: float = 0.0


def answer(rng: np.random.Generator, hedge_share: float, confident_share: float) -> str:
    words = list(rng.choice(WORDS, size=int(rng.integers(5, 60))))
    if rng.random() < confident_share:
        words[0:0] = ["Definitely,"]
    if rng.random() < hedge_share:
        words[0:0] = ["I", "don't", "know,", "maybe"]
    return " ".join(words) + "."


def simulate(seed: int, raters: dict[str, Rater], n_pairs: int, per_pair: int = 1, gold_share: float = 0.0,
             hedge_share: float = 0.0, confident_share: float = 0.0) -> list[dict]:  # fmt: skip
    """Rows in the export's format: each pair goes to ``per_pair`` distinct raters, each shown the answers
    in a random order; a share ``gold_share`` of the pairs carries the known answer."""
    rng = np.random.default_rng(seed)
    names = list(raters)
    rows = []
    for i in range(n_pairs):
        a, b = answer(rng, hedge_share, confident_share), answer(rng, hedge_share, confident_share)
        delta = dict(zip(FEATURES, answer_features(a) - answer_features(b), strict=True))
        a_better, has_gold = rng.random() < 0.5, rng.random() < gold_share
        for name in rng.choice(names, size=per_pair, replace=False):
            r, a_left = raters[name], rng.random() < 0.5
            logit = r.skill * (1 if a_better else -1) + r.length * delta["length"] + r.hedging * delta["hedging"]
            logit += r.left * (1 if a_left else -1)
            a_chosen = rng.random() < 1 / (1 + math.exp(-logit))
            rows.append({"prompt": f"question {i}", "chosen": a if a_chosen else b, "rejected": b if a_chosen else a,
                         "pair_id": str(i), "annotator_id": str(name),
                         "position": "left" if a_chosen == a_left else "right",
                         "gold": ("chosen" if a_chosen == a_better else "rejected") if has_gold else None})  # fmt: skip
    return rows


def covers(effect: dict, value: float) -> bool:
    return effect["low"] <= value <= effect["high"]


# --- planted effects ----------------------------------------------------------------------------


def test_random_annotator_is_flagged_by_gold_and_lowest_by_dawid_skene():
    raters = {name: Rater(skill=2.0) for name in ("ana", "ben", "cat", "dan")} | {"coin": Rater()}
    for seed in SEEDS:
        audit = audit_rows(simulate(seed, raters, 150, per_pair=3, gold_share=1.0), "pool.jsonl", seed=seed)
        flags = audit["reliability"]["flagged"]
        assert [f["annotator"] for f in flags if f["by"] == "gold"] == ["coin"]
        accuracy = {row["annotator"]: row["accuracy"] for row in audit["reliability"]["dawid_skene"]["annotators"]}
        assert accuracy["coin"] < min(v for name, v in accuracy.items() if name != "coin") - 0.1
        assert any(s.startswith("Annotator coin agrees with the known answers") for s in audit["findings"])


def test_length_bias_of_known_size_is_recovered():
    b = 0.6  # log-odds per 10 words
    raters = {name: Rater(length=b) for name in ("ana", "ben", "cat")}
    hits = 0
    for seed in SEEDS:
        audit = audit_rows(simulate(seed, raters, 400), "length.jsonl", seed=seed)
        effect = audit["bias"]["overall"]["joint"]["length"]
        hits += covers(effect, b)
        assert effect["low"] > 0 and effect["n"] == 400
        assert any(s.startswith("Annotators prefer the longer answer: each 10 extra words") for s in audit["findings"])
    assert hits >= 4  # 95% intervals: 5 of 5 expected, 4 allowed


def test_position_bias_is_found():
    left = 0.62  # P(left chosen) = sigmoid(0.62) = 0.65
    raters = {name: Rater(left=left) for name in ("ana", "ben")}
    hits = 0
    for seed in SEEDS:
        audit = audit_rows(simulate(seed, raters, 400), "position.jsonl", seed=seed)
        position = audit["bias"]["overall"]["position"]
        hits += position["low"] <= 1 / (1 + math.exp(-left)) <= position["high"]
        assert any(s.startswith("Annotators choose the answer shown on the left") for s in audit["findings"])
    assert hits >= 4


def test_pool_that_avoids_i_dont_know_gives_a_negative_hedging_effect():
    raters = {name: Rater(skill=1.0, hedging=-1.5) for name in ("ana", "ben", "cat")}
    for seed in SEEDS:
        audit = audit_rows(simulate(seed, raters, 300, hedge_share=0.5), "hedging.jsonl", seed=seed)
        assert audit["bias"]["overall"]["joint"]["hedging"]["high"] < 0
        assert "Annotators avoid answers with hedging or 'I don't know'" in " ".join(audit["findings"])


def honest_abstention_rows(seed: int, raters: dict[str, Rater], n_pairs: int) -> list[dict]:
    """Pairs of an "I don't know" answer and a plain one where the abstention is truly better 80% of the time
    (as on unknowable questions), every pair with its known answer: hedging goes with the truth."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs):
        hedged, plain = answer(rng, 1.0, 0.0), answer(rng, 0.0, 0.0)
        hedged_better = rng.random() < 0.8
        name = str(rng.choice(list(raters)))
        r = raters[name]
        logit = r.skill * (1 if hedged_better else -1) + r.hedging
        hedged_chosen = rng.random() < 1 / (1 + math.exp(-logit))
        rows.append({"prompt": f"question {i}", "chosen": hedged if hedged_chosen else plain,
                     "rejected": plain if hedged_chosen else hedged, "pair_id": str(i), "annotator_id": name,
                     "gold": "chosen" if hedged_chosen == hedged_better else "rejected"})  # fmt: skip
    return rows


def test_beyond_the_known_answers_a_truthful_pool_shows_no_taste_for_hedging():
    truthful = {name: Rater(skill=2.0) for name in ("ana", "ben", "cat")}
    hits = 0
    for seed in SEEDS:
        audit = audit_rows(honest_abstention_rows(seed, truthful, 400), "truthful.jsonl", seed=seed)
        overall = audit["bias"]["overall"]
        assert overall["joint"]["hedging"]["low"] > 0  # hedging goes with the truth: it seems to win
        hits += covers(overall["given_gold"]["hedging"], 0.0)  # beyond the truth it does not
        assert overall["given_gold"]["truth"]["log_odds"] == pytest.approx(2.0, abs=0.5)
    assert hits >= 4


def test_beyond_the_known_answers_a_dislike_of_abstention_is_found():
    averse = {name: Rater(skill=2.0, hedging=-1.0) for name in ("ana", "ben", "cat")}
    hits = 0
    for seed in SEEDS:
        audit = audit_rows(honest_abstention_rows(seed, averse, 400), "averse.jsonl", seed=seed)
        given_gold = audit["bias"]["overall"]["given_gold"]["hedging"]
        hits += covers(given_gold, -1.0)
        assert given_gold["high"] < 0
    assert hits >= 4


def test_clean_pool_has_no_finding():
    raters = {name: Rater(skill=2.0) for name in ("ana", "ben", "cat", "dan")}
    clean = 0
    for seed in SEEDS:
        rows = simulate(100 + seed, raters, 150, per_pair=2, gold_share=0.3, hedge_share=0.4, confident_share=0.3)
        audit = audit_rows(rows, "clean.jsonl", seed=seed)
        assert audit["bias"]["decision"]["effects"] >= 10  # pool and annotators: several features each
        clean += audit["findings"] == []
    assert clean >= 4  # a family-wise error rate of 5% per audit


# --- structure, notes, hygiene ------------------------------------------------------------------


def test_audit_json_keys_are_stable():
    audit = audit_rows(simulate(0, {"ana": Rater(skill=2.0), "ben": Rater(skill=2.0)}, 30, per_pair=2, gold_share=0.5),
                       "keys.jsonl")  # fmt: skip
    assert set(audit) == {"source", "seed", "min_labels", "counts", "agreement", "reliability", "bias", "hygiene",
                          "findings"}  # fmt: skip
    assert audit["counts"] == {"rows": 60, "pairs": 30, "annotators": 2, "rows_without_annotator": 0,
                               "rows_with_gold": audit["counts"]["rows_with_gold"], "rows_with_position": 60,
                               "labels_per_pair": {"2": 30}}  # fmt: skip
    assert set(audit["agreement"]) == {"available", "note", "raw", "cohen", "fleiss", "krippendorff"}
    assert set(audit["agreement"]["cohen"][0]) == {"annotators", "kappa", "n_shared", "note"}
    assert set(audit["reliability"]) == {"available", "note", "dawid_skene", "gold", "flagged"}
    assert set(audit["bias"]) == {"n", "features", "overall", "annotators", "decision"}
    assert set(audit["bias"]["overall"]) == {"single", "joint", "position", "given_gold"}
    effect = audit["bias"]["overall"]["joint"]["length"]
    assert set(effect) == {"name", "feature", "unit", "log_odds", "low", "high", "odds_ratio", "odds_ratio_low",
                           "odds_ratio_high", "n"}  # fmt: skip
    assert effect["name"] == "longer answer (per 10 words)"
    assert set(audit["hygiene"]) == {"duplicate", "contradictory", "identical", "empty", "truncated",
                                     "pair_id_reused", "gold_conflict"}  # fmt: skip
    json.dumps(audit, allow_nan=False)


def test_too_few_overlapping_pairs_gives_the_count_and_the_rest_still_runs():
    rows = simulate(1, {"ana": Rater(length=0.5), "ben": Rater(length=0.5)}, 60)
    rows += [{**rows[0], "annotator_id": "ben" if rows[0]["annotator_id"] == "ana" else "ana"},
             {**rows[1], "annotator_id": "ben" if rows[1]["annotator_id"] == "ana" else "ana"}]  # fmt: skip
    audit = audit_rows(rows, "thin.jsonl")
    alpha = audit["agreement"]["krippendorff"]
    assert (alpha["value"], alpha["n_pairs"]) == (None, 2)
    assert alpha["note"] == "Krippendorff's alpha needs 5 pairs with 2 or more labels; the data has 2"
    assert audit["reliability"]["dawid_skene"]["available"] is False
    assert audit["agreement"]["raw"]["value"] is not None
    assert audit["bias"]["overall"]["joint"]["length"]["n"] == 62


def test_rows_without_annotator_report_agreement_as_not_available():
    rows = [{k: v for k, v in row.items() if k != "annotator_id"} for row in simulate(2, {"x": Rater()}, 40)]
    audit = audit_rows(rows, "anon.jsonl")
    assert audit["agreement"]["available"] is False and audit["agreement"]["note"] == "no annotator_id column"
    assert audit["reliability"]["note"] == "no annotator_id column"
    assert audit["bias"]["overall"]["position"]["n"] == 40 and audit["bias"]["annotators"] == []


def test_pairs_are_grouped_by_content_in_either_order_without_pair_id():
    rows = [{"prompt": "p", "chosen": "yes.", "rejected": "no.", "annotator_id": "a"},
            {"prompt": "p", "chosen": "no.", "rejected": "yes.", "annotator_id": "b"},
            {"prompt": "p", "chosen": "yes.", "rejected": "no.", "annotator_id": "c", "gold": "chosen"}]  # fmt: skip
    audit = audit_rows(rows, "content.jsonl")
    assert audit["counts"]["pairs"] == 1 and audit["counts"]["labels_per_pair"] == {"3": 1}
    # couples a-b, a-c, b-c: only a and c agree
    assert audit["agreement"]["raw"] == {"value": pytest.approx(1 / 3), "n_pairs": 1, "n_couples": 3,
                                         "note": None}  # fmt: skip
    gold = {row["annotator"]: row["accuracy"] for row in audit["reliability"]["gold"]["annotators"]}
    assert gold == {"a": 1.0, "b": 0.0, "c": 1.0}  # the gold of one row is the pair's truth
    assert audit["reliability"]["flagged"] == []  # one label each: under --min-labels, nobody is flagged
    assert audit["hygiene"]["duplicate"]["count"] == 0  # overlap between annotators is not a duplicate


def test_hygiene_counts_planted_problems():
    rows = simulate(3, {"ana": Rater(skill=1.0)}, 12)
    rows[3] = dict(rows[0])  # row 4 repeats row 1
    rows[5] = {**rows[1], "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"]}  # row 6 reverses row 2
    rows[7]["rejected"] = rows[7]["chosen"]  # row 8: identical
    rows[9]["chosen"] = "  "  # row 10: empty
    rows[10]["gold"], rows[2]["gold"] = "chosen", "chosen"
    rows.append({**rows[10], "annotator_id": "ben", "gold": "rejected"})  # row 13: contradicts row 11's gold
    rows.append({**rows[4], "prompt": "another question", "annotator_id": "ben"})  # row 14: pair_id 4 reused
    hygiene = audit_rows(rows, "dirty.jsonl")["hygiene"]
    assert {name: issue["rows"] for name, issue in hygiene.items()} == {
        "duplicate": [4, 6], "contradictory": [6], "identical": [8], "empty": [10], "truncated": [],
        "pair_id_reused": [14], "gold_conflict": [13]}  # fmt: skip
    findings = audit_rows(rows, "dirty.jsonl")["findings"]
    assert "2 rows repeat an earlier row of the same annotator (rows 4, 6)." in findings


def test_bad_rows_name_the_source_row_and_field():
    rows = simulate(4, {"ana": Rater()}, 3)
    rows[2]["gold"] = "a"
    with pytest.raises(UserError, match=r"^bad\.jsonl: row 3, field 'gold': expected 'chosen', 'rejected' or null"):
        audit_rows(rows, "bad.jsonl")
    with pytest.raises(UserError, match=r"^none\.jsonl: no rows"):
        audit_rows([], "none.jsonl")


# --- files, page and command line --------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_script_in_the_data_is_escaped_in_the_page(tmp_path):
    rows = simulate(5, {"<script>alert(1)</script>": Rater(skill=2.0), "ben": Rater(skill=2.0)}, 30, per_pair=2)
    rows[0]["chosen"] = "<script>alert('chosen')</script>"
    write_audit(audit_rows(rows, "<script>source</script>"), tmp_path)
    page = (tmp_path / "audit.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 2  # forest plot and accuracy plot
    assert json.loads((tmp_path / "audit.json").read_text())["source"] == "<script>source</script>"


def test_cli_writes_both_files_and_refuses_to_overwrite(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", simulate(6, {"ana": Rater(length=1.0), "ben": Rater()}, 40))
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), "--output", str(out), "--min-labels", "10"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["audit.html", "audit.json"]
    assert json.loads((out / "audit.json").read_text())["min_labels"] == 10
    capsys.readouterr()
    assert main(["audit", "--data", str(data), "--output", str(out)]) == 2
    assert "directory is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["audit", "--data", str(data), "--output", str(out), "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "audit.json").read_text())["seed"] == 3


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "p", "chosen": "a"}'], "row 1: missing field 'rejected'"),
        (['{"prompt": "p", "chosen": "a", "rejected": "b", "position": "top"}'], "row 1, field 'position'"),
        (['{"prompt": "p", "chosen": "a", "rejected": "b", "gold": "yes"}'], "row 1, field 'gold'"),
        (['{"prompt": "p", "chosen": "a", "rejected": "b"}', "{not json"], "line 2: not valid JSON"),
        ([], "the dataset has no rows"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, lines, message):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(data) in err
    assert not out.exists()


def test_cli_refuses_output_that_is_the_data_and_a_missing_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", simulate(7, {"ana": Rater()}, 5))
    assert main(["audit", "--data", str(data), "--output", str(data), "--overwrite"]) == 2
    assert "holds --data" in capsys.readouterr().err
    assert main(["audit", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "--data " in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert data.read_text().count("\n") == 5
