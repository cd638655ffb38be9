"""PPO, GRPO and RLOO on a tiny model with a rule-based reward; rollouts, rewards, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, write_jsonl
from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.rewards import parse_reward
from posttrain.stages import rl_common
from posttrain.stages.ppo import token_rewards
from posttrain.training.rollout import left_pad, response_mask

RULES = """
def vowel_fraction(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]

def wrong_length(prompts, completions):
    return [0.0]

def not_a_number(prompts, completions):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def rl_files(tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS] * 4)
    return prompts, rules


def rl_args(command, tiny_model, prompts, reward, output, *extra):
    return [command, "--model", str(tiny_model), "--prompts", str(prompts), "--reward", reward,
            "--output", str(output), "--rollout-prompts", "16" if command == "ppo" else "8", "--batch-size", "8",
            "--max-new-tokens", "8", "--temperature", "1.0", "--missing-eos-penalty", "0", *extra]  # fmt: skip


def scores(output: Path) -> tuple[list[float], list[dict]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["objective/scores"] for r in records], records


@pytest.mark.parametrize(("command", "lr"), [("ppo", "1e-2"), ("grpo", "1e-2"), ("rloo", "1e-2")])
def test_rl_raises_a_rule_based_reward(tiny_model, tmp_path, rl_files, monkeypatch, command, lr):
    prompts, rules = rl_files
    references, original = [], rl_common.load_rl_reference  # keep the reference to check it stayed frozen
    monkeypatch.setattr(rl_common, "load_rl_reference", lambda *a: references.append(original(*a)) or references[-1])
    args = rl_args(command, tiny_model, prompts, f"{rules}:vowel_fraction", tmp_path / "out", "--max-steps", "30",
                   "--learning-rate", lr, "--lr-scheduler", "constant")  # fmt: skip
    assert main(args) == 0
    values, records = scores(tmp_path / "out")
    assert sum(values[-5:]) / 5 > sum(values[:5]) / 5 + 0.05, values
    assert all(torch.isfinite(torch.tensor(r["objective/kl"])) for r in records)
    names = {"objective/scores", "objective/kl", "completions/mean_length", "completions/eos_fraction",
             "policy/approxkl", "policy/clipfrac"}  # fmt: skip
    if command == "ppo":
        names |= {"objective/entropy", "objective/rlhf_reward", "val/clipfrac", "val/explained_variance", "val/mean"}
    assert names <= set(records[-1])
    (reference,) = references  # the frozen reference kept the starting weights
    start = load_file(Path(tiny_model) / "model.safetensors")
    assert all(torch.equal(t, start[n]) for n, t in reference.model.state_dict().items() if n in start)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "score"} <= set(samples[0]) and samples[-1]["step"] == 30


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_rl_resume_is_bit_identical(tiny_model, tmp_path, rl_files, command):
    prompts, rules = rl_files
    common = ["--max-steps", "6", "--save-steps", "3", "--learning-rate", "1e-2"]
    common += ["--kl-target", "0.5", "--kl-horizon", "100"] if command == "ppo" else []  # adaptive β is resumed too
    full = tmp_path / "full"
    assert main(rl_args(command, tiny_model, prompts, f"{rules}:vowel_fraction", full, *common)) == 0
    # the state a run killed after iteration 4 leaves: the step-3 checkpoint, metrics up to 4, no final model
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (cut / name).unlink(missing_ok=True)
    lines = (cut / "metrics.jsonl").read_text().splitlines()[:4]
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    assert main(rl_args(command, tiny_model, prompts, f"{rules}:vowel_fraction", cut, *common, "--resume")) == 0
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "metrics.jsonl").read_text().count("\n") == (cut / "metrics.jsonl").read_text().count("\n") == 6
    last_full, last_cut = scores(full)[1][-1], scores(cut)[1][-1]
    assert {k: v for k, v in last_full.items() if "per_second" not in k} == {
        k: v for k, v in last_cut.items() if "per_second" not in k
    }  # scores, KL, β (objective/kl_coef for PPO), losses: all replayed exactly


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, ended = response_mask(responses, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_left_pad():
    ids, mask = left_pad([[3, 4], [5]], pad_id=0)
    assert ids.tolist() == [[3, 4], [0, 5]] and mask.tolist() == [[1, 1], [0, 1]]


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5, in_reward=True)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.25, 0.0, 0.0]]))
    only_score = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5, in_reward=False)
    torch.testing.assert_close(only_score, torch.tensor([[0.0, 0.0, 1.0], [-2.0, 0.0, 0.0]]))


def test_reward_specs(tmp_path, rl_files):
    _, rules = rl_files
    reward = parse_reward(f"2*{rules}:vowel_fraction + 0.5*{rules}:vowel_fraction")
    torch.testing.assert_close(reward(["p", "p"], ["aa", "bb"]), torch.tensor([2.5, 0.0]))
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):
        parse_reward(f"{rules}:wrong_length")(["p", "p"], ["a", "b"])
    with pytest.raises(UserError, match="NaN"):
        parse_reward(f"{rules}:not_a_number")(["p"], ["a"])
    with pytest.raises(UserError, match="has no function 'missing'"):
        parse_reward(f"{rules}:missing")
    with pytest.raises(UserError, match="cannot import no_such_module"):
        parse_reward("no_such_module:f")
    with pytest.raises(UserError, match="not a number"):
        parse_reward(f"x*{rules}:vowel_fraction")


def test_prompts_without_a_prompt_column_give_one_line(tiny_model, tmp_path, rl_files, capsys):
    _, rules = rl_files
    data = write_jsonl(tmp_path / "no-prompt.jsonl", [{"text": "hello"}] * 8)
    assert main(rl_args("grpo", tiny_model, data, f"{rules}:vowel_fraction", tmp_path / "out")) == 2
    assert "need a 'prompt' column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_model):
    """A reward model sharing the policy's tokenizer, and one with a tokenizer of its own."""
    from conftest import corpus, preference_rows
    from posttrain.models.factory import build_llama, train_tokenizer

    root = tmp_path_factory.mktemp("reward-models")
    other = root / "other-base"
    tokenizer = train_tokenizer(corpus(seed=5), vocab_size=280)
    build_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    data = write_jsonl(root / "pairs.jsonl", preference_rows(64))
    for base, name in ((tiny_model, "same"), (other, "other")):
        args = ["rm", "--model", str(base), "--data", str(data), "--output", str(root / name), "--max-steps", "4"]
        assert main([*args, "--learning-rate", "1e-3", "--batch-size", "8"]) == 0
    return root / "same", root / "other"


def test_reward_models_score_any_policy_and_can_seed_the_value(tiny_model, tmp_path, rl_files, reward_models, capsys):
    prompts, _ = rl_files
    same, other = reward_models
    short = ["--max-steps", "2", "--learning-rate", "1e-3", "--save-steps", "0"]
    # a reward model with another tokenizer re-tokenizes the text: no refusal; a reward model can be the gold too
    gold = ["--gold-reward", str(other)]
    assert main(rl_args("grpo", tiny_model, prompts, f"{other} + 0.5*{same}", tmp_path / "g", *short, *gold)) == 0
    _, records = scores(tmp_path / "g")
    assert all(torch.isfinite(torch.tensor(r["objective/scores"])) for r in records)
    assert all(torch.isfinite(torch.tensor(r["objective/gold"])) for r in records)
    # PPO with the value model initialised from the reward model (InstructGPT)
    assert main(rl_args("ppo", tiny_model, prompts, str(same), tmp_path / "p", *short, "--value-model", "reward")) == 0
    _, records = scores(tmp_path / "p")
    assert torch.isfinite(torch.tensor(records[-1]["loss/value"]))
    # ... which needs the policy's tokenizer
    code = main(rl_args("ppo", tiny_model, prompts, str(other), tmp_path / "q", *short, "--value-model", "reward"))
    assert code == 2 and "--value-model policy" in capsys.readouterr().err
