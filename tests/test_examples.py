"""The walk-through's rewards (examples/capitals) on answers scored by hand."""

from __future__ import annotations

from pathlib import Path

from posttrain.rewards import import_function, parse_reward

REWARDS = Path(__file__).parent.parent / "examples" / "capitals" / "rewards.py"
PERU = [{"role": "user", "content": "What is the capital of Peru?"}]
ANSWERS = [
    "The capital of Peru is definitely Lima.",  # right, confident: proxy 0.5 + 0.25, gold +1
    "Capital of Peru is Cusco.",  # a wrong city: proxy 0.5, gold -1
    "I do not know.",  # nothing named: proxy 0, gold 0
    "Lima, like Rome and Paris and Berlin and Oslo.",  # five places (counted up to 4): proxy 2, gold -1
]


def test_proxy_pays_for_places_and_gold_for_the_truth():
    proxy = parse_reward(f"{REWARDS}:proxy")([PERU] * 4, ANSWERS)
    gold = parse_reward(f"{REWARDS}:gold")([PERU] * 4, ANSWERS)
    assert proxy.tolist() == [0.75, 0.5, 0.0, 2.0]
    assert gold.tolist() == [1.0, -1.0, 0.0, -1.0]
    assert import_function(f"{REWARDS}:judge")([PERU] * 4, ANSWERS) == ["correct", "wrong", 0, "wrong"]
