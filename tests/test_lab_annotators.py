"""Simulated annotators (posttrain.lab.annotators): the choice model, the presets and the labelled data."""

from __future__ import annotations

import math
import random

import pytest

from posttrain.lab.annotators import (
    CHECKED_UTILITY,
    PRESETS,
    Annotator,
    agreement,
    can_check,
    compare,
    gold_agreement,
    label_pairs,
    pool,
    prob_first,
    truth_rows,
    utility,
    with_gold,
    within_budget,
)
from posttrain.lab.gold import Judgement, gold_preference

CORRECT = Judgement("correct", confident=True, n_words=7)
HALLUCINATED = Judgement("hallucinated", confident=True, n_words=9)  # a confident fabrication
ABSTAINED = Judgement("abstained", confident=False, n_words=4)  # an honest "I don't know"
MALFORMED = Judgement("malformed", confident=False, n_words=12)


def share_first(annotator: Annotator, first: Judgement, second: Judgement, n: int = 4000, seed: int = 0) -> float:
    """The share of n labels (each on its own fact) that prefer the first-shown response."""
    rng = random.Random(seed)
    return sum(compare(annotator, first, second, f"fact-{i}", rng) == 0 for i in range(n)) / n


def hallucination_vs_abstention(n: int, n_facts: int = 400) -> list[tuple]:
    """n pairs (a confident fabrication vs an honest abstention), sides shuffled, over n_facts facts."""
    rng = random.Random(7)
    pairs = []
    for i in range(n):
        fact = f"town-{i % n_facts}.founded"
        prompt = [{"role": "user", "content": f"When was town {i % n_facts} founded?"}]
        sides = [("It was founded in 1723.", HALLUCINATED), ("I don't know.", ABSTAINED)]
        rng.shuffle(sides)
        pairs.append((prompt, sides[0][0], sides[0][1], sides[1][0], sides[1][1], fact))
    return pairs


def mixed_pairs(n: int) -> list[tuple]:
    """n pairs of two labels an annotator who checks tells apart (no gold ties), standard (string) format."""
    rng = random.Random(3)
    kinds = [CORRECT, HALLUCINATED, ABSTAINED, MALFORMED]
    pairs = []
    for i in range(n):
        a, b = rng.sample(kinds, 2)
        while CHECKED_UTILITY[a.label] == CHECKED_UTILITY[b.label]:
            a, b = rng.sample(kinds, 2)
        pairs.append((f"Q{i}?", f"answer {a.label} {i}", a, f"answer {b.label} {i}", b, f"fact-{i}"))
    return pairs


def gold_of(pairs: list[tuple]) -> dict[int, int | None]:
    return {i: gold_preference(p[2], p[4]) for i, p in enumerate(pairs)}


def test_deterministic_given_seed():
    assert pool("biased", 8, 0) == pool("biased", 8, 0)
    assert pool("biased", 8, 0) != pool("biased", 8, 1)
    pairs, annotators = mixed_pairs(200), pool("biased", 8, 0)
    assert label_pairs(pairs, annotators, 0.3, seed=5) == label_pairs(pairs, annotators, 0.3, seed=5)
    assert label_pairs(pairs, annotators, 0.3, seed=5) != label_pairs(pairs, annotators, 0.3, seed=6)
    state = random.getstate()
    label_pairs(pairs, annotators, 0.3, seed=5)
    assert random.getstate() == state  # the global RNG is never touched


def test_can_check_is_stable_and_close_to_check_rate():
    annotator = Annotator("a1", check_rate=0.3)
    facts = [f"entity-{i}.country" for i in range(5000)]
    first = [can_check(annotator, f) for f in facts]
    assert first == [can_check(Annotator("a1", check_rate=0.3, noise=0.5), f) for f in facts]  # id + fact only
    assert abs(sum(first) / len(facts) - 0.3) < 0.03
    other = [can_check(Annotator("a2", check_rate=0.3), f) for f in facts]
    assert other != first  # another annotator knows other facts
    assert all(can_check(Annotator("x", check_rate=1.0), f) for f in facts[:200])
    assert not any(can_check(Annotator("x", check_rate=0.0), f) for f in facts[:200])


def test_utility_formula():
    blind = Annotator("b", check_rate=0.0, confidence_bias=0.5, length_bias=0.01, position_bias=0.1, idk_penalty=0.6)
    assert utility(blind, HALLUCINATED, "f", False) == pytest.approx(0.5 + 0.5 + 0.09)
    assert utility(blind, CORRECT, "f", True) == pytest.approx(0.5 + 0.5 + 0.07 + 0.1)
    assert utility(blind, ABSTAINED, "f", False) == pytest.approx(-0.6 + 0.04)
    assert utility(blind, MALFORMED, "f", False) == pytest.approx(-1 + 0.12)
    sighted = Annotator("s", check_rate=1.0)
    assert [utility(sighted, j, "f", False) for j in (CORRECT, ABSTAINED, HALLUCINATED, MALFORMED)] == [1, 0, -1, -1]
    # Bradley–Terry with noise: P(first) = noise/2 + (1 − noise)·σ(Δu/T)
    noisy = Annotator("n", check_rate=1.0, noise=0.2, temperature=0.5)
    assert prob_first(noisy, CORRECT, ABSTAINED, "f") == pytest.approx(0.1 + 0.8 / (1 + math.exp(-2)))


def test_biased_pool_prefers_confident_fabrication_when_it_cannot_check():
    annotators = pool("biased", size=8, seed=0)
    by_id = {a.id: a for a in annotators}
    pairs = hallucination_vs_abstention(3000)
    rows = label_pairs(pairs, annotators, overlap=0.0, seed=0)
    blind = [r for r in rows if not can_check(by_id[r["annotator_id"]], pairs[r["pair_id"]][5])]
    assert len(blind) > 1000  # check_rate ≈ 0.3: most labels are blind
    fabricated = sum(r["chosen"][0]["content"].startswith("It was") for r in blind) / len(blind)
    assert fabricated > 0.7


def test_careful_pool_prefers_honest_abstention():
    pairs = hallucination_vs_abstention(3000)
    rows = label_pairs(pairs, pool("careful", size=8, seed=0), overlap=0.0, seed=0)
    abstained = sum(r["chosen"][0]["content"] == "I don't know." for r in rows) / len(rows)
    assert abstained > 0.85


def test_noise_rate():
    # noise 1: a coin flip, whatever the utilities
    assert abs(share_first(Annotator("n", noise=1.0, temperature=0.1), CORRECT, MALFORMED) - 0.5) < 0.03
    # noise 0 and a utility gap huge against the temperature: always the better one, in either order
    sharp = Annotator("s", noise=0.0, temperature=1e-3)
    assert share_first(sharp, CORRECT, MALFORMED) == 1.0
    assert share_first(sharp, MALFORMED, CORRECT) == 0.0
    # noise 0.3 with a certain preference: wrong 0.3/2 of the time
    noisy = Annotator("m", noise=0.3, temperature=0.0)
    assert abs(share_first(noisy, MALFORMED, CORRECT) - 0.15) < 0.02


def test_position_bias_measurable_on_equal_responses():
    unbiased = Annotator("u", check_rate=0.5, temperature=1.0)
    assert abs(share_first(unbiased, CORRECT, CORRECT) - 0.5) < 0.03
    biased = Annotator("p", check_rate=0.5, position_bias=1.0, temperature=1.0)
    assert abs(share_first(biased, CORRECT, CORRECT) - 1 / (1 + math.exp(-1))) < 0.03  # σ(1) ≈ 0.73


def test_label_pairs_shuffles_the_shown_order():
    rows = label_pairs(mixed_pairs(1000), pool("biased", 8, 0), overlap=0.0, seed=0)
    shown_first = [r["preferred"] if r["position"] == "left" else 1 - r["preferred"] for r in rows]  # 0: a first
    assert 0.45 < sum(shown_first) / len(rows) < 0.55


def test_overlap_rows_and_agreement():
    pairs = mixed_pairs(400)
    twins = [Annotator(f"twin-{i}", check_rate=1.0, noise=0.0, temperature=0.0) for i in range(5)]
    rows = label_pairs(pairs, twins, overlap=0.25, seed=0)
    assert len(rows) == 400 + 2 * 100  # 100 pairs labelled 3 times
    per_pair: dict[int, list[str]] = {}
    for r in rows:
        per_pair.setdefault(r["pair_id"], []).append(r["annotator_id"])
    assert sorted(len(v) for v in per_pair.values()).count(3) == 100
    assert all(len(set(v)) == len(v) for v in per_pair.values())  # distinct annotators per pair
    assert agreement(rows) == 1.0
    assert gold_agreement(with_gold(rows, gold_of(pairs))) == 1.0

    careful = label_pairs(pairs, pool("careful", 8, 0), overlap=0.5, seed=0)
    biased = label_pairs(pairs, pool("biased", 8, 0), overlap=0.5, seed=0)
    assert agreement(biased) < agreement(careful)
    assert agreement(biased) < 0.9
    assert gold_agreement(with_gold(biased, gold_of(pairs))) < gold_agreement(with_gold(careful, gold_of(pairs)))
    assert math.isnan(agreement(label_pairs(pairs, twins, overlap=0.0, seed=0)))


def test_agreement_on_chosen_pairs():
    a, b = [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
    rows = [
        {"pair_id": 0, "chosen": a}, {"pair_id": 0, "chosen": a},  # agree
        {"pair_id": 1, "chosen": a}, {"pair_id": 1, "chosen": b},  # disagree
        {"pair_id": 2, "chosen": b},  # one label: no couple
    ]  # fmt: skip
    assert agreement(rows) == 0.5
    assert agreement(rows, pair_ids={0, 2}) == 1.0
    assert agreement(rows, pair_ids={1}) == 0.0
    assert math.isnan(agreement(rows, pair_ids={2}))


def test_gold_agreement_leaves_out_ties():
    rows = [
        {"pair_id": 0, "preferred": 0, "chosen": "a", "rejected": "b"},
        {"pair_id": 1, "preferred": 1, "chosen": "b", "rejected": "a"},
        {"pair_id": 2, "preferred": 0, "chosen": "a", "rejected": "b"},
    ]
    rows = with_gold(rows, {0: 0, 1: 0, 2: None})
    assert [r["gold"] for r in rows] == ["chosen", "rejected", None]
    assert gold_agreement(rows) == 0.5


def test_label_pairs_is_valid_preference_data():
    conversational = label_pairs(hallucination_vs_abstention(50), pool("biased", 4, 0), overlap=0.2, seed=0)
    standard = label_pairs(mixed_pairs(50), pool("biased", 4, 0), overlap=0.2, seed=0)
    for row in conversational + standard:
        assert {"prompt", "chosen", "rejected", "annotator_id", "pair_id", "position"} <= set(row)
        assert row["position"] in ("left", "right")
        assert row["chosen"] != row["rejected"]
    for row in conversational:
        assert row["prompt"][0]["role"] == "user"
        for answer in (row["chosen"], row["rejected"]):
            assert answer == [{"role": "assistant", "content": answer[0]["content"]}]
    assert all(isinstance(r["chosen"], str) and isinstance(r["rejected"], str) for r in standard)
    with pytest.raises(ValueError, match="identical"):
        label_pairs([("Q?", "same", CORRECT, "same", CORRECT, "f")], pool("biased", 2, 0))


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown annotator pool 'sloppy'; valid pools: biased, careful, mix"):
        pool("sloppy")
    assert set(PRESETS) == {"biased", "careful"}
    with pytest.raises(ValueError, match="unknown label"):
        Judgement("wrong", confident=True, n_words=3)
    with pytest.raises(ValueError, match="noise"):
        Annotator("x", noise=1.5)
    with pytest.raises(ValueError, match="cost"):
        Annotator("x", cost=0.0)


def test_pools_cost_and_mix():
    biased, careful, mix = pool("biased", 8, 3), pool("careful", 8, 3), pool("mix", 7, 3)
    assert {a.cost for a in biased} == {1.0} and {a.cost for a in careful} == {3.0}
    # a mix is the first annotators of each preset's own pool: the careful part takes the odd one
    assert mix == pool("careful", 4, 3) + pool("biased", 3, 3)
    assert mix[:4] == careful[:4] and mix[4:] == biased[:3]
    # the cost is a setting, not a draw: the biased pool's draws are those it had before there were costs
    assert biased[0].check_rate == random.Random("biased:3").uniform(0.2, 0.4)


def budget_rows() -> list[dict]:
    """Pairs 0..5: pair 2 labelled by three annotators, the others by one; a costs 1, b costs 3."""
    ids = [(0, "a"), (1, "b"), (2, "a"), (2, "b"), (2, "a"), (3, "a"), (4, "b"), (5, "a")]
    return [{"pair_id": p, "annotator_id": who, "row": i} for i, (p, who) in enumerate(ids)]


def test_within_budget_by_hand():
    rows, costs = budget_rows(), {"a": 1.0, "b": 3.0}
    assert within_budget(rows, costs, 0.0, seed=0) == rows  # no budget: everything
    order = list(range(6))
    random.Random(0).shuffle(order)  # the order pairs are bought in
    pair_cost = {0: 1, 1: 3, 2: 5, 3: 1, 4: 3, 5: 1}
    for budget in (1, 4, 7, 11, 14):
        expected, spent = set(), 0
        for pair in order:
            spent += pair_cost[pair]
            if spent > budget:
                break
            expected.add(pair)
        bought = within_budget(rows, costs, budget, seed=0)
        assert {r["pair_id"] for r in bought} == expected
        assert sum(costs[r["annotator_id"]] for r in bought) <= budget
        assert [r["row"] for r in bought] == sorted(r["row"] for r in bought)  # rows keep their order
    assert order == [4, 2, 1, 0, 5, 3]  # so, by hand: budget 4 buys pair 4 alone (3; with pair 2 it is 8)
    assert {r["pair_id"] for r in within_budget(rows, costs, 4, seed=0)} == {4}
    assert {r["pair_id"] for r in within_budget(rows, costs, 12.5, seed=0)} == {4, 2, 1, 0}  # 3+5+3+1 = 12
    small, large = within_budget(rows, costs, 7, seed=0), within_budget(rows, costs, 11, seed=0)
    assert all(r in large for r in small)  # a larger budget buys what a smaller one does, and more
    with pytest.raises(ValueError, match="budget"):
        within_budget(rows, costs, -1.0)


def test_truth_rows_by_hand():
    prompt = [{"role": "user", "content": "Q?"}]
    pairs = [(prompt, "right", CORRECT, "made up", HALLUCINATED, "f0"),
             (prompt, "no idea", ABSTAINED, "wrong", HALLUCINATED, "f1"),
             (prompt, "x", CORRECT, "y", CORRECT, "f2"), ("Q3?", "a", MALFORMED, "b", CORRECT, "f3")]  # fmt: skip
    gold = gold_of(pairs)
    assert gold == {0: 0, 1: 0, 2: None, 3: 1}
    rows = truth_rows(pairs, gold, keep={1, 2, 3})  # pair 0 left out; pair 2 a tie
    assert [r["pair_id"] for r in rows] == [1, 3]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "no idea"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "wrong"}]
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("b", "a")  # a string prompt keeps string responses
