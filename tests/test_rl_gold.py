"""The RL stages' gold reward, held-out prompts and over-optimisation detector, on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import WORDS, write_jsonl
from posttrain.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RULES = """
import random

import numpy as np
import torch


def vowel_fraction(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def noisy_gold(prompts, completions):
    # draws from every random generator: the run must not notice
    torch.rand(3), np.random.rand(3), random.random()
    return [len(text) % 3 for text in completions]


def minus_vowels(prompts, completions):
    return [-v for v in vowel_fraction(prompts, completions)]


def wrong_count(prompts, completions):
    return [0.0]


def not_a_number(prompts, completions):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def gold_files(tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS] * 4)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"tell {w}"} for w in WORDS[:6]])
    return prompts, held_out, rules


def rl_args(command, model, prompts, rules, output, *extra):
    return [command, "--model", str(model), "--prompts", str(prompts), "--reward", f"{rules}:vowel_fraction",
            "--output", str(output), "--rollout-prompts", "16" if command == "ppo" else "8", "--batch-size", "8",
            "--max-new-tokens", "8", "--temperature", "1.0", "--missing-eos-penalty", "0",
            "--learning-rate", "1e-2", *extra]  # fmt: skip


def records(output: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (output / name).read_text().splitlines()]


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_gold_and_held_out_prompts_leave_the_update_bit_identical(tiny_model, tmp_path, gold_files, command):
    prompts, held_out, rules = gold_files
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert main(rl_args(command, tiny_model, prompts, rules, plain, "--max-steps", "4")) == 0
    assert main(rl_args(command, tiny_model, prompts, rules, watched, "--max-steps", "4",
                        "--gold-reward", f"{rules}:noisy_gold", "--eval-prompts", str(held_out),
                        "--eval-steps", "2", "--onset-window", "2")) == 0  # fmt: skip
    assert (plain / "model.safetensors").read_bytes() == (watched / "model.safetensors").read_bytes()
    a, b = records(plain), records(watched)
    assert [r["objective/scores"] for r in a] == [r["objective/scores"] for r in b if r["step"]]
    steps = {r["step"]: r for r in b}
    assert set(steps) == {0, 1, 2, 3, 4}
    assert {"eval/objective/scores", "eval/objective/gold", "eval/objective/sqrt_kl"} <= set(steps[0])
    assert "eval/objective/gold" in steps[2] and "eval/objective/gold" not in steps[3]
    for r in (steps[s] for s in (1, 2, 3, 4)):
        assert {"objective/gold", "objective/gold_std", "objective/sqrt_kl", "objective/entropy_per_token"} <= set(r)
        assert r["objective/sqrt_kl"] == pytest.approx(max(r["objective/kl"], 0) ** 0.5)
    samples = records(watched, "samples.jsonl")
    assert all(s["gold"] == len(s["completion"]) % 3 for s in samples)
    summary = json.loads((watched / "overoptimisation.json").read_text())
    assert set(summary) == {"fit", "onset", "best_gold", "warnings"}
    assert summary["best_gold"]["directory"] == "best-gold" and (watched / "best-gold" / "config.json").is_file()


def test_gold_every_scores_the_first_every_nth_and_last_iteration(tiny_model, tmp_path, gold_files):
    prompts, _, rules = gold_files
    out = tmp_path / "out"
    assert main(rl_args("grpo", tiny_model, prompts, rules, out, "--max-steps", "5", "--gold-reward",
                        f"{rules}:noisy_gold", "--gold-every", "2")) == 0  # fmt: skip
    assert [r["step"] for r in records(out) if "objective/gold" in r] == [1, 2, 4, 5]


def test_stop_on_overoptimisation_keeps_the_best_gold_policy(tiny_model, tmp_path, gold_files):
    """A gold reward opposed to the proxy: as the proxy rises, gold falls; the run stops at the onset."""
    prompts, _, rules = gold_files
    out = tmp_path / "out"
    assert main(rl_args("grpo", tiny_model, prompts, rules, out, "--max-steps", "40", "--gold-reward",
                        f"{rules}:minus_vowels", "--stop-on-overoptimisation", "--onset-window", "3",
                        "--onset-z", "1")) == 0  # fmt: skip
    summary = json.loads((out / "overoptimisation.json").read_text())
    onset, steps = summary["onset"], [r["step"] for r in records(out)]
    assert onset is not None and steps[-1] == onset["step"] < 40
    assert onset["gold"] < onset["best_gold"] and onset["proxy"] > onset["proxy_at_peak"]
    assert summary["best_gold"]["step"] <= onset["peak_step"] + 3
    AutoModelForCausalLM.from_pretrained(out / "best-gold")  # a loadable checkpoint
    assert (out / "model.safetensors").is_file()


def test_without_gold_the_kl_budget_warns_once(tiny_model, tmp_path, gold_files):
    prompts, _, rules = gold_files
    out = tmp_path / "out"
    args = rl_args("grpo", tiny_model, prompts, rules, out, "--max-steps", "8", "--kl-budget", "1e-6",
                   "--onset-window", "2")  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "overoptimisation.json").read_text())
    assert [w["kind"] for w in summary["warnings"]].count("kl_budget") == 1
    assert summary["fit"] is None and summary["onset"] is None and not (out / "best-gold").exists()


@pytest.mark.parametrize(
    ("gold", "extra", "message"),
    [
        ("missing_module_xyz:f", [], "--gold-reward missing_module_xyz:f: cannot import"),
        ("RULES:wrong_count", [], "--gold-reward RULES:wrong_count: returned 1 scores for 32 completions"),
        ("RULES:not_a_number", [], "--gold-reward RULES:not_a_number: returned a NaN or infinite score"),
        ("", ["--stop-on-overoptimisation"], "--stop-on-overoptimisation needs --gold-reward"),
        ("RULES:noisy_gold", ["--gold-every", "0"], "--gold-every must be at least 1"),
        ("", ["--gold-every", "2"], "--gold-every needs --gold-reward"),
        ("", ["--eval-steps", "2"], "--eval-steps needs --eval-prompts"),
    ],
)
def test_bad_gold_options_give_one_line(tiny_model, tmp_path, gold_files, capsys, gold, extra, message):
    prompts, _, rules = gold_files
    out = tmp_path / "out"
    gold = gold.replace("RULES", str(rules))
    extra = [*extra, *(["--gold-reward", gold] if gold else [])]
    assert main(rl_args("grpo", tiny_model, prompts, rules, out, "--max-steps", "2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("posttrain grpo: error: ") and message.replace("RULES", str(rules)) in err[-1], err
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_watch_all_samples(tiny_model, tmp_path, gold_files):
    """Two processes: the gold statistics cover both processes' samples and both take the same decisions."""
    prompts, held_out, rules = gold_files
    out = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain",
    ]  # fmt: skip
    args = rl_args("grpo", tiny_model, prompts, rules, out, "--max-steps", "3", "--gold-reward",
                   f"{rules}:noisy_gold", "--eval-prompts", str(held_out), "--onset-window", "2")  # fmt: skip
    run = subprocess.run(launch + args, env=ENV, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    metrics = records(out)
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]
    assert all(r["objective/gold_count"] == 2 * 8 * 4 for r in metrics[1:])  # 8 prompts x 4 completions each
    assert json.loads((out / "overoptimisation.json").read_text())["best_gold"]["step"] >= 2


def test_resume_replays_the_detector_exactly(tiny_model, tmp_path, gold_files):
    prompts, _, rules = gold_files
    common = ["--max-steps", "6", "--save-steps", "3", "--gold-reward", f"{rules}:noisy_gold", "--onset-window", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(rl_args("grpo", tiny_model, prompts, rules, full, *common)) == 0
    # what a run killed during iteration 5 leaves: the step-3 checkpoint, metrics up to 4, no summary
    shutil.copytree(full, cut)
    (cut / "model.safetensors").unlink()
    (cut / "overoptimisation.json").unlink()
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in records_text(cut)[:4]))
    assert main(rl_args("grpo", tiny_model, prompts, rules, cut, *common, "--resume")) == 0
    assert (full / "overoptimisation.json").read_text() == (cut / "overoptimisation.json").read_text()
    assert [r["objective/gold"] for r in records(full)] == [r["objective/gold"] for r in records(cut)]


def records_text(output: Path) -> list[str]:
    return (output / "metrics.jsonl").read_text().splitlines()
