"""Export of labels: the three aggregations on hand-worked cases, and rows that rm and dpo read and train on."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from conftest import preference_rows, write_jsonl
from posttrain.annotate.export import build_rows, export_rows
from posttrain.annotate.pairs import PairRecord
from posttrain.annotate.store import Label, Store
from posttrain.cli import main
from posttrain.data.formats import detect_format
from posttrain.data.loading import load_rows
from posttrain.models.loading import load_tokenizer
from posttrain.stages import dpo, rm

PAIRS = [
    PairRecord("p1", "q1", "A1", "B1", "b"),
    PairRecord("p2", "q2", "A2", "B2", None),
    PairRecord("p3", "q3", "A3", "B3", None),
    PairRecord("p4", "q4", "A4", "B4", None),  # never labelled: no row
]


def label(pair_id: str, annotator: str, choice: str, left: str, strength: int | None = None) -> Label:
    return Label(pair_id, annotator, choice, left, strength, "", 5.0, 100.0, False)


LABELS = [
    label("p1", "ann", "a", "a", 2),
    label("p1", "bob", "b", "a"),
    label("p1", "cy", "tie", "b"),
    label("p2", "ann", "a", "b"),
    label("p2", "bob", "a", "a"),
    label("p2", "cy", "b", "b"),
    label("p3", "ann", "both_bad", "a"),
]


def brief(row: dict, *names: str) -> tuple:
    return tuple(row[name] for name in names)


def test_all_one_row_per_label_position_and_gold_relative_to_chosen():
    rows, dropped = build_rows(PAIRS, LABELS, "all", keep_ties=False)
    assert dropped == 2
    names = ("pair_id", "annotator_id", "chosen", "rejected", "position", "gold", "choice")
    assert [brief(row, *names) for row in rows] == [
        ("p1", "ann", "A1", "B1", "left", "rejected", "a"),
        ("p1", "bob", "B1", "A1", "right", "chosen", "b"),
        ("p2", "ann", "A2", "B2", "right", None, "a"),
        ("p2", "bob", "A2", "B2", "left", None, "a"),
        ("p2", "cy", "B2", "A2", "left", None, "b"),
    ]
    assert brief(rows[0], "prompt", "strength", "comment", "seconds", "is_check") == ("q1", 2, "", 5.0, False)
    with_ties, dropped = build_rows(PAIRS, LABELS, "all", keep_ties=True)
    assert dropped == 0 and len(with_ties) == 7
    assert brief(with_ties[2], *names) == ("p1", "cy", "A1", "B1", "right", "rejected", "tie")
    assert brief(with_ties[6], *names) == ("p3", "ann", "A3", "B3", "left", None, "both_bad")


def test_majority_one_row_per_pair_and_ties():
    rows, dropped = build_rows(PAIRS, LABELS, "majority", keep_ties=False)
    assert dropped == 2 and len(rows) == 1
    [p2] = rows
    assert brief(p2, "pair_id", "chosen", "rejected", "tie", "gold") == ("p2", "A2", "B2", False, None)
    assert p2["votes"] == {"a": 2, "b": 1, "tie": 0, "both_bad": 0} and p2["agreement"] == pytest.approx(2 / 3)
    assert p2["annotator_ids"] == ["ann", "bob", "cy"] and "annotator_id" not in p2 and "position" not in p2
    rows, dropped = build_rows(PAIRS, LABELS, "majority", keep_ties=True)
    assert dropped == 0 and [row["pair_id"] for row in rows] == ["p1", "p2", "p3"]
    p1, _, p3 = rows
    assert brief(p1, "tie", "chosen", "agreement", "gold") == (True, "A1", 0.5, "rejected")
    assert p1["votes"] == {"a": 1, "b": 1, "tie": 1, "both_bad": 0}
    assert brief(p3, "tie", "agreement", "annotator_ids") == (True, None, ["ann"])


def test_reliability_trusts_the_annotators_who_agree():
    """r1 and r2 agree on six pairs and u contradicts them; on the contested pair c, r1 says b and u says a:
    a majority tie, which Dawid–Skene gives to r1. Pair t has only a tie vote: no posterior, a tie."""
    pairs = [PairRecord(f"q{i}", "q", f"A{i}", f"B{i}", None) for i in range(6)]
    pairs += [PairRecord(name, "q", f"A{name}", f"B{name}", None) for name in ("c", "t")]
    labels = []
    for i in range(6):
        side, other = ("a", "b") if i % 2 else ("b", "a")
        labels += [label(f"q{i}", "r1", side, "a"), label(f"q{i}", "r2", side, "a"), label(f"q{i}", "u", other, "a")]
    labels += [label("c", "r1", "b", "a"), label("c", "u", "a", "a"), label("t", "x", "tie", "a")]
    majority = {row["pair_id"]: row for row in build_rows(pairs, labels, "majority", True)[0]}
    assert majority["c"]["tie"]
    rows, dropped = build_rows(pairs, labels, "reliability", keep_ties=False)
    assert dropped == 1
    by_id = {row["pair_id"]: row for row in rows}
    assert set(by_id) == {"q0", "q1", "q2", "q3", "q4", "q5", "c"}
    assert brief(by_id["c"], "chosen", "tie", "agreement") == ("Bc", False, 0.5) and by_id["c"]["p_chosen"] > 0.9
    assert by_id["q1"]["chosen"] == "A1" and by_id["q0"]["chosen"] == "B0"
    assert all(row["p_chosen"] > 0.9 for row in rows)
    [t] = [row for row in build_rows(pairs, labels, "reliability", True)[0] if row["tie"]]
    assert brief(t, "pair_id", "chosen", "p_chosen", "agreement") == ("t", "At", None, None)


def test_reliability_posterior_of_exactly_one_half_is_a_tie():
    """Two annotators, two pairs, opposite votes on both: by symmetry prior and posteriors are exactly 0.5."""
    pairs = [PairRecord("s", "q", "As", "Bs", None), PairRecord("u", "q", "Au", "Bu", None)]
    labels = [
        label("s", "x", "a", "a"),
        label("s", "y", "b", "a"),
        label("u", "x", "b", "a"),
        label("u", "y", "a", "a"),
    ]
    assert build_rows(pairs, labels, "reliability", keep_ties=False) == ([], 2)
    rows = build_rows(pairs, labels, "reliability", keep_ties=True)[0]
    assert [brief(row, "tie", "chosen", "p_chosen") for row in rows] == [(True, "As", 0.5), (True, "Au", 0.5)]


def test_message_prompts_give_assistant_messages():
    prompt = [{"role": "user", "content": "hi"}]
    pairs = [PairRecord("1", prompt, "hello", "go away", "a")]
    for aggregate in ("all", "majority", "reliability"):
        [row] = build_rows(pairs, [label("1", "ann", "a", "b")], aggregate, False)[0]
        assert row["prompt"] == prompt and row["gold"] == "chosen"
        assert row["chosen"] == [{"role": "assistant", "content": "hello"}]
        assert row["rejected"] == [{"role": "assistant", "content": "go away"}]


def labelled_db(tmp_path: Path, n: int, conversational: bool) -> Path:
    """A database of ``n`` learnable pairs (the answer ending in "yes" is better), labelled by two
    annotators who mostly get it right; the left side and which response is "a" vary."""
    source = preference_rows(n, seed=1, conversational=conversational)
    text = (lambda answer: answer[0]["content"]) if conversational else (lambda answer: answer)
    rows = []
    for i, row in enumerate(source):
        good, bad = text(row["chosen"]), text(row["rejected"])
        a, b = (good, bad) if i % 2 else (bad, good)
        rows.append({"prompt": row["prompt"], "response_a": a, "response_b": b})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    store = Store.create_or_open(tmp_path / "labels.db", pairs, 2, 0.0, 0, str(pairs))
    for name in ("ann", "bob"):
        store.add_annotator(name)
    for name in ("ann", "bob"):
        while (assignment := store.next_assignment(name)) is not None:
            better = "a" if assignment.pair.response_a.endswith("yes") else "b"
            wrong = name == "bob" and int(assignment.pair.id) % 5 == 0
            store.record_label(name, assignment.id, {"a": "b", "b": "a"}[better] if wrong else better, None, "")
    assert export_rows(store, "all", False) == build_rows(store.pairs(), store.labels(), "all", False)[0]
    store.close()
    return tmp_path / "labels.db"


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("aggregate", ["all", "majority", "reliability"])
def test_exports_load_as_preference_data_for_rm_and_dpo(tiny_model, tmp_path, conversational, aggregate):
    db = labelled_db(tmp_path, 10, conversational)
    output = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db), "--output", str(output), "--aggregate", aggregate]) == 0
    rows = load_rows(str(output))
    fmt = detect_format(rows, str(output))
    assert (fmt.name, fmt.conversational) == ("preference", conversational)
    # bob errs on pairs 5 and 10: with two annotators nothing tells who erred, so both aggregates call them ties
    assert len(rows) == (20 if aggregate == "all" else 8)
    tokenizer = load_tokenizer(str(tiny_model))
    config = dpo.DPOConfig(model=str(tiny_model), data=str(output), output="-")
    assert len(dpo.prepare(rows, str(output), tokenizer, config).dataset) == len(rows)
    rm.prepare(rows, str(output), tokenizer, rm.RMConfig(model=str(tiny_model), data=str(output), output="-"))


@pytest.mark.slow
def test_an_export_trains_a_reward_model_and_dpo(tiny_model, tmp_path):
    db = labelled_db(tmp_path, 24, conversational=False)
    prefs = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db), "--output", str(prefs), "--aggregate", "all"]) == 0
    assert datasets.Dataset.from_json(str(prefs)).num_rows == 48
    common = ["--model", str(tiny_model), "--data", str(prefs), "--batch-size", "4", "--seed", "3", "--debug"]
    assert main(["rm", *common, "--output", str(tmp_path / "rm"), "--max-steps", "2", "--logging-steps", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert main(["dpo", *common, "--output", str(tmp_path / "dpo"), "--max-steps", "1"]) == 0
    assert (tmp_path / "dpo" / "config.json").is_file()
