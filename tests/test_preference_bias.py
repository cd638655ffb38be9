"""Bias probes and hygiene checks of preference data, on rows generated here with planted effects."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posttrain.errors import UserError
from posttrain.ops.preference_bias import (
    FEATURES,
    answer_features,
    bias_probes,
    hygiene,
    joint_probe,
    looks_truncated,
    parse_rows,
    per_annotator,
    position_bias,
    truth_probe,
)

SEEDS = range(5)
# Neutral words: none is a confident, hedging, list or markdown marker.
WORDS = "the river town trades wool and salt along an old road near green hills where farmers grow barley".split()


def answer(rng: np.random.Generator, n_words: int, confident: bool = False, hedging: bool = False) -> str:
    words = list(rng.choice(WORDS, size=n_words))
    if confident:
        words[0:0] = ["Definitely,"]
    if hedging:
        words[0:0] = ["I", "don't", "know,", "maybe"]
    return " ".join(words) + "."


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_rows(seed: int, n: int, log_odds, style=lambda rng: {}, annotator=None) -> list[dict]:
    """n pairs of answers a, b of random length and style; a is chosen with probability
    sigmoid(log_odds(features(a) − features(b)))."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a = answer(rng, int(rng.integers(5, 60)), **style(rng))
        b = answer(rng, int(rng.integers(5, 60)), **style(rng))
        delta = dict(zip(FEATURES, answer_features(a) - answer_features(b), strict=True))
        a_wins = rng.random() < sigmoid(log_odds(delta))
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": f"q{seed}-{i}", "chosen": chosen, "rejected": rejected, "annotator_id": annotator})
    return rows


def covers(effect, value: float) -> bool:
    return effect.low <= value <= effect.high


# --- features and parsing -----------------------------------------------------------------------


def test_answer_features_by_hand():
    text = "## Answer\nI don't know, but **probably**:\n1. one\n2. two"
    # 11 words -> 1.1; no confident marker; "dont know" and "probably" hedge; numbered lines; heading
    assert answer_features(text).tolist() == [1.1, 0.0, 1.0, 1.0, 1.0]
    assert answer_features("Of course it is Velmora.").tolist() == [0.5, 1.0, 0.0, 0.0, 0.0]
    assert answer_features("Use `x` - not a list, 2 sure.").tolist()[2:] == [0.0, 0.0, 0.0]


def test_parse_rows_reads_chat_messages_and_positions():
    rows = [
        {
            "prompt": [{"role": "user", "content": "Where?"}],
            "chosen": [{"role": "assistant", "content": "Here."}],
            "rejected": [{"role": "assistant", "content": "There."}],
            "position": "Right",
            "annotator_id": 7,
        },
        {"prompt": "Where?", "chosen": "Here.", "rejected": "There.", "position": 0},
    ]
    first, second = parse_rows(rows)
    assert (first.prompt, first.chosen, first.rejected, first.position, first.annotator) == (
        "Where?",
        "Here.",
        "There.",
        1,
        "7",
    )
    assert (second.position, second.annotator, second.row) == (0, None, 2)
    assert first.prompt_key != second.prompt_key  # a chat prompt and a plain one are different prompts


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "row 1: missing field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "position": "top"}, "row 1, field 'position'"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "row 1, field 'chosen'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "row 1, field 'chosen'"),
    ],
)
def test_parse_rows_names_the_bad_row_and_field(row, message):
    with pytest.raises(UserError, match=message):
        parse_rows([row])


# --- bias probes --------------------------------------------------------------------------------


def test_length_bias_of_known_size_is_recovered():
    b = 0.6  # log-odds per 10 words
    hits = 0
    for seed in SEEDS:
        effect = bias_probes(parse_rows(make_rows(seed, 600, lambda d: b * d["length"])), seed=seed)["length"]
        hits += covers(effect, b)
        assert effect.low > 0.3 and effect.n == 600
        assert effect.odds_ratio == pytest.approx(math.exp(effect.log_odds))
    assert hits >= 4


def test_pool_that_avoids_abstentions_gives_a_negative_hedging_effect():
    b = -1.5
    hits = 0
    for seed in SEEDS:
        rows = make_rows(seed, 600, lambda d: b * d["hedging"], style=lambda rng: {"hedging": rng.random() < 0.5})
        joint = joint_probe(parse_rows(rows), seed=seed)
        hits += covers(joint["hedging"], b)
        assert joint["hedging"].high < -0.5
        assert joint["confident"] is None  # never present, so never differs: not estimable
    assert hits >= 4


def test_feature_without_effect_covers_zero():
    hits = 0
    for seed in SEEDS:
        rows = make_rows(seed, 600, lambda d: 0.6 * d["length"], style=lambda rng: {"confident": rng.random() < 0.5})
        hits += covers(bias_probes(parse_rows(rows), seed=seed)["confident"], 0.0)
    assert hits >= 4


def test_joint_model_separates_length_from_confident_wording():
    """Confident answers are longer here, and only length is preferred: alone, confident wording looks
    preferred; beside length in the joint model, it does not."""

    def rows_for(seed):
        rng = np.random.default_rng(100 + seed)
        rows = []
        for i in range(600):
            sure = rng.random() < 0.5, rng.random() < 0.5
            a, b = (answer(rng, int(rng.integers(40, 70) if s else rng.integers(5, 35)), confident=s) for s in sure)
            a_wins = rng.random() < sigmoid(0.8 * (len(a.split()) - len(b.split())) / 10)
            rows.append({"prompt": f"q{i}", "chosen": a if a_wins else b, "rejected": b if a_wins else a})
        return parse_rows(rows)

    joint_hits = 0
    for seed in SEEDS:
        pairs = rows_for(seed)
        assert bias_probes(pairs, seed=seed)["confident"].low > 0.5
        joint_hits += covers(joint_probe(pairs, seed=seed)["confident"], 0.0)
    assert joint_hits >= 4


def position_rows(left_share: float, seed: int, n: int = 500) -> list[dict]:
    """n pairs whose chosen answer was shown on the left with probability left_share ("left"/"right" and 0/1 mixed)."""
    left = np.random.default_rng(seed).random(n) < left_share
    sides = [("left" if is_left else "right") if i % 2 else int(not is_left) for i, is_left in enumerate(left)]
    return [{"prompt": f"q{i}", "chosen": "a.", "rejected": "b.", "position": side} for i, side in enumerate(sides)]


def test_position_bias_detected_and_absent():
    planted_hits, absent_hits = 0, 0
    for seed in SEEDS:
        biased = position_bias(parse_rows(position_rows(0.65, seed)))
        planted_hits += biased.low <= 0.65 <= biased.high
        assert biased.low > 0.55
        assert biased.intercept == pytest.approx(math.log(biased.share / (1 - biased.share)))
        fair = position_bias(parse_rows(position_rows(0.5, 1000 + seed)))
        absent_hits += fair.low <= 0.5 <= fair.high
    assert planted_hits >= 4 and absent_hits >= 4


def test_position_bias_by_hand():
    sides = ["left"] * 7 + ["right"] * 3
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "position": side} for side in sides]
    result = position_bias(parse_rows(rows))
    # Wilson, p = 0.7, n = 10, z = 1.96: (0.7 + 0.19207 ± 0.34288) / 1.38415
    assert (result.n, result.left_chosen) == (10, 7)
    assert result.low == pytest.approx(0.39677, abs=1e-4) and result.high == pytest.approx(0.89221, abs=1e-4)
    # logit intercept log(7/3), standard error sqrt(1/7 + 1/3)
    se = math.sqrt(1 / 7 + 1 / 3)
    assert result.intercept == pytest.approx(math.log(7 / 3), abs=1e-6)
    assert result.intercept_low == pytest.approx(math.log(7 / 3) - 1.959964 * se, abs=1e-4)
    assert position_bias(parse_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}])) is None


def test_random_annotator_shows_no_effect_while_the_others_do():
    b = 0.8
    for seed in SEEDS[:3]:
        rows = make_rows(seed, 400, lambda d: b * d["length"], annotator="careful")
        rows += make_rows(50 + seed, 400, lambda d: b * d["length"], annotator="also careful")
        rows += make_rows(80 + seed, 400, lambda d: 0.0, annotator="coin")
        rows += make_rows(90 + seed, 5, lambda d: 0.0, annotator="newcomer")
        probes = {p.annotator: p for p in per_annotator(parse_rows(rows), seed=seed)}
        assert abs(probes["coin"].effects["length"].log_odds) < 0.2
        assert covers(probes["coin"].effects["length"], 0.0)
        assert probes["careful"].effects["length"].low > 0.4
        assert probes["also careful"].effects["length"].low > 0.4
        assert (probes["newcomer"].n, probes["newcomer"].effects, probes["newcomer"].position) == (5, None, None)


# --- hygiene ------------------------------------------------------------------------------------


def test_hygiene_finds_each_planted_issue_at_its_row():
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"q{i}", "chosen": answer(rng, 8), "rejected": answer(rng, 9)} for i in range(12)]
    assert {name: issue.count for name, issue in hygiene(parse_rows(rows)).items()} == {
        "duplicate": 0,
        "contradictory": 0,
        "identical": 0,
        "empty": 0,
        "truncated": 0,
    }
    rows[2] = dict(rows[0])  # row 3 repeats row 1
    rows[4] = {"prompt": "q1", "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"]}  # row 5 reverses row 2
    rows[6]["rejected"] = rows[6]["chosen"]  # row 7
    rows[8]["rejected"] = " \n "  # row 9
    rows[10]["chosen"] = " ".join(["word"] * 25) + " and then the"  # row 11 stops mid-sentence
    found = hygiene(parse_rows(rows))
    assert {name: issue.rows for name, issue in found.items()} == {
        "duplicate": (3, 5),  # a reversed repeat is a duplicate too
        "contradictory": (5,),
        "identical": (7,),
        "empty": (9,),
        "truncated": (11,),
    }
    assert found["duplicate"].count == 2


def test_truncation_rule():
    many = " ".join(["word"] * 25)
    assert looks_truncated(many + " and")
    assert looks_truncated(many + ",")
    assert not looks_truncated(many + ".")
    assert not looks_truncated("short and unpunctuated")
    assert not looks_truncated(many + ":\n- first item\n- second item")


def test_truth_probe_needs_gold_and_orients_the_truth():
    rows = make_rows(0, 300, lambda d: 0.0)
    assert truth_probe(parse_rows(rows)) is None  # no gold column: nothing to hold fixed
    # An annotator who picks the truly better answer 90% of the time, styles aside: γ = logit(0.9) = ln 9 ≈ 2.20
    rng = np.random.default_rng(1)
    for row in rows:
        row["gold"] = "chosen" if rng.random() < 0.9 else "rejected"
    effects = truth_probe(parse_rows(rows))
    assert covers(effects["truth"], math.log(9))
    assert effects["truth"].n == 300 and covers(effects["length"], 0.0)
