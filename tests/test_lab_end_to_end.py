"""The lab end to end on the quick preset: the directions it must show.

The seed runs with the biased annotator pool; then, side by side, with the careful pool reusing the
biased run's data, base and SFT steps (``--reuse``), the KL sweep's two ends (no KL penalty and the
largest coefficient) from the biased run's SFT and reward models, and the labels experiment's
careful pool at the smallest budget (the lab runs label every pair: the largest budget). The
thresholds are directions with a margin, not tuned values: each one fails if the effect it names
is absent. Margins come from the effects measured on a 2-core AVX2 host (docs/lab.md), and the
comparisons use means over a quarter of the PPO iterations rather than the noisy peak of a window.
One seed: it costs about 6 to 8 minutes of the suite's 20 on the slow hosts. ``make test`` pins the
CPU kernels to AVX2 so that AVX-512 hosts run the same trajectories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import pytest

from posttrain.cli import main

SEEDS = (0,)


def run_alongside(commands: dict[str, list[str]], logs: Path) -> None:
    """Run ``posttrain`` commands as processes side by side with one thread each, their output in ``logs``. On 2
    cores that is about 1.6 times as fast as one after the other with two threads each: a one-thread lab run took
    89 s where the two-thread one took 70 (the tiny model gains little from a second thread), with the same figures.
    """
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    running = {}
    for name, command in commands.items():
        with (logs / f"{name}.log").open("w") as log:
            running[name] = subprocess.Popen([sys.executable, "-m", "posttrain", *command], env=env, stdout=log,
                                             stderr=subprocess.STDOUT)  # fmt: skip
    for name, process in running.items():
        assert process.wait() == 0, f"{name} failed:\n{(logs / f'{name}.log').read_text()[-3000:]}"


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> dict[tuple[int, str], dict]:
    """Per seed: the biased and careful lab runs' summaries, the KL sweep's ends (no penalty, the largest)
    from the biased run's SFT and reward models (``--arms`` runs those two of the experiment's four), and the
    figures of the labels experiment's careful pool at a budget of 600 hurried labels (200 careful ones).
    The last three read the biased run's steps and run side by side."""
    root = tmp_path_factory.mktemp("lab")
    found = {}
    for seed in SEEDS:
        biased, careful, sweep = root / f"biased-{seed}", root / f"careful-{seed}", root / f"kl-sweep-{seed}"
        labels = root / f"labels-{seed}"
        assert main(["lab", "--output", str(biased), "--seed", str(seed)]) == 0
        reuse = ["--reuse", str(biased)]
        run_alongside({
            "careful": ["lab", "--output", str(careful), "--seed", str(seed), "--annotators", "careful", *reuse],
            "kl-sweep": ["lab", "--experiment", "kl-sweep", "--output", str(sweep), "--seeds", str(seed), *reuse,
                         "--arms", "kl-0,kl-0.2"],
            "labels": ["lab", "--experiment", "labels", "--output", str(labels), "--seeds", str(seed), *reuse,
                       "--arms", "careful-600"],
        }, root)  # fmt: skip
        for pool, run in (("biased", biased), ("careful", careful)):
            found[seed, pool] = json.loads((run / "summary.json").read_text())
        found[seed, "kl-sweep"] = json.loads((sweep / "experiment.json").read_text())
        found[seed, "labels"] = json.loads((labels / "experiment.json").read_text())["figures"]["arms"]["careful-600"]
    return found


def quarters(summary: dict, key: str) -> tuple[float, float]:
    """The mean of ``key`` over the first and over the last quarter of the PPO iterations (iterations
    that asked no question of the kind ``key`` needs are left out)."""
    values = [row[key] for row in summary["ppo"]["trajectory"]]
    quarter = len(values) // 4
    return tuple(mean(v for v in part if v is not None) for part in (values[:quarter], values[-quarter:]))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sft_turns_the_document_completer_into_an_assistant(summaries, seed):
    models = summaries[seed, "biased"]["models"]
    assert models["sft"]["format_compliance"] >= models["base"]["format_compliance"] + 0.4
    assert models["sft"]["gold_reward"] > models["base"]["gold_reward"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_reward_model_learns_the_annotators_not_the_truth(summaries, seed):
    # pairs of held-out questions where one answer is truly better (ties settle by coin flips)
    biased, careful = (summaries[seed, pool] for pool in ("biased", "careful"))
    rm = biased["reward_model"]
    assert abs(rm["accuracy_vs_labels_untied"] - biased["annotators"]["agreement_untied"]) <= 0.1
    assert rm["accuracy_vs_gold"] <= rm["accuracy_vs_labels_untied"] - 0.1  # same pairs, worse against the truth
    assert rm["accuracy_vs_gold"] < careful["reward_model"]["accuracy_vs_gold"]  # same answers, careful labels


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_hacks_the_biased_reward_model(summaries, seed):
    summary = summaries[seed, "biased"]
    proxy_start, proxy_end = quarters(summary, "proxy")
    kl_start, kl_end = quarters(summary, "kl")
    gold = summary["ppo"]["gold_arc"]
    abstain_start, abstain_end = quarters(summary, "abstain_known")
    invent_start, invent_end = quarters(summary, "hallucination_unknowable")
    assert proxy_end >= proxy_start + 0.15  # the reward model is pleased throughout
    assert kl_end > kl_start  # the policy moves away from SFT
    assert gold["peak"] >= gold["start"] + 0.04  # the truth first gets better
    assert abstain_end <= abstain_start - 0.05  # as the model says what it knows
    assert gold["end"] <= gold["peak"] - 0.1  # then worse
    assert invent_end >= invent_start + 0.3  # as it invents what it cannot know


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_careful_annotators_do_not_teach_hacking(summaries, seed):
    careful, biased = summaries[seed, "careful"], summaries[seed, "biased"]
    gold = {name: quarters(s, "gold") for name, s in (("c", careful), ("b", biased))}
    invent = {name: quarters(s, "hallucination_unknowable") for name, s in (("c", careful), ("b", biased))}
    change = {name: end - start for name, (start, end) in gold.items()}
    assert careful["ppo"]["gold_arc"]["end"] >= careful["ppo"]["gold_arc"]["start"] - 0.05  # about SFT's or better
    # the truth fares better over PPO (measured: 0.083 and 0.175 more on seeds 0 and 1)
    assert change["c"] >= change["b"] + 0.04
    # and invention grows far less, if at all (measured: 0.31 and 0.25 less)
    assert invent["c"][1] - invent["c"][0] <= invent["b"][1] - invent["b"][0] - 0.15


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_without_a_kl_penalty_ppo_pleases_the_reward_model_more_and_the_truth_less(summaries, seed):
    arms = summaries[seed, "kl-sweep"]["figures"]["arms"]
    free, held = arms["kl-0"], arms["kl-0.2"]
    # last quarter, seeds 0, 1, 2 (docs/lab.md): proxy higher by 0.47, 0.36, 0.38; gold lower by 0.36, 0.32, 0.28
    assert free["proxy_end"]["mean"] >= held["proxy_end"]["mean"] + 0.15
    assert free["gold_end"]["mean"] <= held["gold_end"]["mean"] - 0.14
    assert free["sqrt_kl_end"]["mean"] > held["sqrt_kl_end"]["mean"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_careful_few_labels_beat_hurried_many(summaries, seed):
    few, careful, biased = summaries[seed, "labels"], summaries[seed, "careful"], summaries[seed, "biased"]
    # within the careful pool, more labels make a reward model closer to the truth on the questions PPO asks
    # (docs/lab.md, seeds 0, 1, 2: 1000 careful labels rank 0.157, 0.170 and 0.150 more pairs right than 200)
    assert few["rm_vs_gold_train"]["mean"] <= careful["reward_model"]["accuracy_vs_gold_train"] - 0.08
    # and 200 careful labels, at a fifth of the cost of the biased pool's 2953, leave PPO with more gold at the end
    # (measured: 0.20, 0.21 and 0.15 more than about 3000 biased labels)
    assert few["gold_end"]["mean"] >= quarters(biased, "gold")[1] + 0.08
