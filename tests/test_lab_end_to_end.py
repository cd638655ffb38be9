"""The lab end to end on the quick preset, two seeds: the directions it must show.

Each seed runs with the biased annotator pool, then with the careful pool reusing the biased
run's data, base and SFT steps (``--reuse``). The thresholds are directions with a margin, not
tuned values: each one fails if the effect it names is absent.
"""

from __future__ import annotations

import json
from statistics import mean

import pytest

from posttrain.cli import main

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> dict[tuple[int, str], dict]:
    root = tmp_path_factory.mktemp("lab")
    found = {}
    for seed in SEEDS:
        biased, careful = root / f"biased-{seed}", root / f"careful-{seed}"
        assert main(["lab", "--output", str(biased), "--seed", str(seed)]) == 0
        assert main(["lab", "--output", str(careful), "--seed", str(seed), "--annotators", "careful",
                     "--reuse", str(biased)]) == 0  # fmt: skip
        for pool, run in (("biased", biased), ("careful", careful)):
            found[seed, pool] = json.loads((run / "summary.json").read_text())
    return found


def quarters(summary: dict, key: str) -> tuple[float, float]:
    """The mean of ``key`` over the first and over the last quarter of the PPO iterations."""
    values = [row[key] for row in summary["ppo"]["trajectory"]]
    quarter = len(values) // 4
    return mean(values[:quarter]), mean(values[-quarter:])


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sft_turns_the_document_completer_into_an_assistant(summaries, seed):
    models = summaries[seed, "biased"]["models"]
    assert models["sft"]["format_compliance"] >= models["base"]["format_compliance"] + 0.4
    assert models["sft"]["gold_reward"] > models["base"]["gold_reward"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_reward_model_learns_the_annotators_not_the_truth(summaries, seed):
    for pool in ("biased", "careful"):  # as consistent with the labels as the annotators are with each other
        summary = summaries[seed, pool]
        assert abs(summary["reward_model"]["accuracy_vs_labels"] - summary["annotators"]["agreement"]) <= 0.1
    biased, careful = (summaries[seed, pool]["reward_model"] for pool in ("biased", "careful"))
    assert biased["accuracy_vs_gold"] < careful["accuracy_vs_gold"]  # same answers, biased labels: less true
    assert biased["accuracy_vs_gold"] < biased["accuracy_vs_labels"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_hacks_the_biased_reward_model(summaries, seed):
    summary = summaries[seed, "biased"]
    proxy_start, proxy_end = quarters(summary, "proxy")
    gold_start, gold_end = quarters(summary, "gold")
    kl_start, kl_end = quarters(summary, "kl")
    hallucination_start, hallucination_end = quarters(summary, "hallucination_rate")
    assert proxy_end >= proxy_start + 0.15  # the reward model is pleased
    assert kl_end > kl_start  # the policy moves away from SFT
    assert gold_end <= gold_start - 0.05  # the truth gets worse
    assert hallucination_end > hallucination_start  # by making things up


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_careful_annotators_do_not_teach_hallucination(summaries, seed):
    careful_start, careful_end = quarters(summaries[seed, "careful"], "hallucination_rate")
    biased_start, biased_end = quarters(summaries[seed, "biased"], "hallucination_rate")
    assert careful_end <= careful_start + 0.02
    assert biased_end - biased_start > careful_end - careful_start + 0.05
