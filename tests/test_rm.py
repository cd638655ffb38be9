"""``posttrain rm``: learns held-out preferences, groups ranked responses, scores at the last real token."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import preference_rows, write_jsonl
from posttrain.cli import main
from posttrain.data.preference import prompt_and_answer
from posttrain.errors import UserError
from posttrain.models.loading import load_tokenizer
from posttrain.models.reward_model import (
    aggregate,
    load_reward_backbone,
    load_reward_ensemble,
    load_reward_model,
    reward_scores,
)
from posttrain.stages.rm import RMConfig, expected_calibration_error, member_config, prepare, rm_loss


def rm(model: Path, data: Path, output: Path, *extra: str) -> Path:
    """``posttrain rm --model M --data D --output O ...``; ``--debug`` lets a UserError through to the test."""
    argv = ["rm", "--model", str(model), "--data", str(data), "--output", str(output), "--seed", "3", "--debug"]
    assert main([*argv, *extra]) == 0
    return output


def records(output: Path) -> tuple[list[dict], list[dict], dict]:
    """Training records, the loop's eval records, and the final calibration/statistics record."""
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/loss" in r], lines[-1]


def prepared(tiny_model: Path, rows: list[dict], **overrides):
    config = RMConfig(model=str(tiny_model), data="rows", output="-", **overrides)
    return config, prepare(datasets.Dataset.from_list(rows), "rows", load_tokenizer(str(tiny_model)), config)


class FixedRewards(torch.nn.Module):
    """Stands in for a reward model: returns given rewards, records how many rows it scored."""

    def __init__(self, rewards: list[float]) -> None:
        super().__init__()
        self.rewards, self.rows = torch.tensor(rewards), []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(input_ids))
        return self.rewards


@pytest.mark.parametrize("conversational", [False, True])
def test_rm_learns_held_out_preferences(tiny_model, tmp_path, conversational):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(300, conversational=conversational))
    output = rm(tiny_model, data, tmp_path / "out", "--max-steps", "30", "--learning-rate", "1e-3",
                "--batch-size", "8", "--eval-split", "0.2", "--logging-steps", "10")  # fmt: skip
    train, evals, final = records(output)
    assert train[-1]["loss"] < train[0]["loss"]
    names = {"accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/mean"}
    assert names <= set(train[-1]) and {f"eval/{n}" for n in names} <= set(evals[-1])
    assert evals[-1]["eval/accuracy"] >= 0.9 and final["eval/accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    assert final["step"] == 30 and 0.0 <= final["eval/ece"] <= 1.0 and final["eval/pairs"] == 60
    stats = json.loads((output / "reward_stats.json").read_text())
    assert stats["count"] == 2 * 240 and stats["std"] > 0  # every distinct training response, scored once

    model, tokenizer, loaded_stats = load_reward_model(output)  # one call
    assert not model.training and loaded_stats.mean == pytest.approx(stats["mean"])
    row = preference_rows(1, seed=99, conversational=conversational)[0]
    ids = []
    for answer in (row["chosen"], row["rejected"]):
        prompt_ids, answer_ids = prompt_and_answer(row["prompt"], answer, conversational, tokenizer)
        ids.append(torch.tensor([prompt_ids + answer_ids]))
    with torch.no_grad():
        good, bad = (reward_scores(model, i, torch.ones_like(i)) for i in ids)
    assert good.shape == (1,) and good.item() > bad.item()


def test_ranked_responses_form_one_example(tiny_model):
    ask, other = "what is the colour of the sky", "say cat"
    rows = [{"prompt": ask, "chosen": " blue", "rejected": " red"},  # A > B
            {"prompt": other, "chosen": " cat", "rejected": " dog"},
            {"prompt": ask, "chosen": " blue", "rejected": " grass"},  # A > C
            {"prompt": ask, "chosen": " red", "rejected": " grass"}]  # B > C  # fmt: skip
    config, data = prepared(tiny_model, rows)
    tokenizer = load_tokenizer(str(tiny_model))
    answer = {text: prompt_and_answer(ask, text, False, tokenizer)[1] for text in (" blue", " red", " grass")}
    group = data.dataset[0]
    assert len(data.dataset) == 2 and group["row"] == 1
    assert group["responses"] == [answer[" blue"], answer[" red"], answer[" grass"]]  # each response once
    assert (group["chosen"], group["rejected"]) == ([0, 0, 1], [1, 2, 2])

    batch = data.collate(data.dataset[[0, 1]])
    assert batch["input_ids"].shape[0] == 5 and int(batch["n_targets"]) == 2  # 3 + 2 responses, 2 prompts
    assert batch["chosen"].tolist() == [0, 0, 1, 3] and batch["rejected"].tolist() == [1, 2, 2, 4]
    assert batch["pair_group"].tolist() == [0, 0, 0, 1] and batch["response_group"].tolist() == [0, 0, 0, 1, 1]

    scorer = FixedRewards([2.0, 1.0, 0.0, 0.5, 0.5])  # A, B, C; cat, dog
    out = rm_loss(scorer, batch, config)
    first = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3  # the mean over the prompt's 3 pairs
    assert scorer.rows == [5] and out.loss_sum.item() == pytest.approx(first + math.log(2))
    assert out.metric_sums["accuracy"].item() == pytest.approx(1.0)  # 3/3 right, then a tie (counted wrong)
    assert out.metric_sums["margin"].item() == pytest.approx(4 / 3)
    assert out.metric_sums["rewards/mean"].item() == pytest.approx(1.0 + 0.5)


def test_margin_and_centering_change_the_loss_by_hand(tiny_model):
    rows = [{"prompt": "say cat", "chosen": " cat", "rejected": " dog", "margin": 2.0}]
    config, with_margin = prepared(tiny_model, rows)
    _, without = prepared(tiny_model, [{k: v for k, v in rows[0].items() if k != "margin"}])
    scorer = FixedRewards([1.0, 0.0])
    loss = rm_loss(scorer, with_margin.collate(with_margin.dataset[[0]]), config).loss_sum.item()
    plain = rm_loss(scorer, without.collate(without.dataset[[0]]), config).loss_sum.item()
    assert loss == pytest.approx(math.log1p(math.e))  # −log σ(1 − 0 − 2)
    assert plain == pytest.approx(math.log1p(math.exp(-1)))  # −log σ(1 − 0)
    assert loss - plain == pytest.approx(1.0)  # log(1 + e) − log(1 + 1/e) = log e
    config.center_rewards_coefficient = 0.1
    centred = rm_loss(scorer, without.collate(without.dataset[[0]]), config).loss_sum.item()
    assert centred - plain == pytest.approx(0.1 * (1.0 + 0.0) ** 2)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_scores_do_not_depend_on_padding(tiny_model, tiny_model_pad_eos, pad_is_eos):
    source = str(tiny_model_pad_eos if pad_is_eos else tiny_model)
    tokenizer = load_tokenizer(source)
    model = load_reward_backbone(source, tokenizer.pad_token_id).eval()
    prompt_ids, answer_ids = prompt_and_answer("say the cat sat", " on a mat", False, tokenizer)
    ids = prompt_ids + answer_ids
    assert ids[-1] == tokenizer.eos_token_id and (tokenizer.pad_token_id == tokenizer.eos_token_id) == pad_is_eos
    pad = tokenizer.pad_token_id

    def score(row: list[int], mask: list[int]) -> float:
        with torch.no_grad():
            return reward_scores(model, torch.tensor([row]), torch.tensor([mask])).item()

    alone = score(ids, [1] * len(ids))
    for n in (1, 7, 30):
        assert abs(score(ids + [pad] * n, [1] * len(ids) + [0] * n) - alone) < 1e-5  # right padding
        assert abs(score([pad] * n + ids, [0] * n + [1] * len(ids)) - alone) < 1e-5  # left padding
    batch = torch.tensor([ids + [pad] * 5, ids[:-2] + [pad] * 7])
    mask = (torch.arange(batch.shape[1]) < torch.tensor([[len(ids)], [len(ids) - 2]])).long()
    with torch.no_grad():
        in_batch = reward_scores(model, batch, mask)
        pooled_by_pad_id = model(input_ids=batch, attention_mask=mask).logits.squeeze(-1)
    assert abs(in_batch[0].item() - alone) < 1e-5
    assert abs(in_batch[1].item() - score(ids[:-2], [1] * (len(ids) - 2))) < 1e-5
    if pad_is_eos:  # Hugging Face's own pooling takes EOS for padding and scores the token before it
        assert abs(pooled_by_pad_id[0].item() - alone) > 1e-4


def test_lora_reward_model_trains_and_reloads(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(64))
    output = rm(tiny_model, data, tmp_path / "out", "--max-steps", "8", "--learning-rate", "1e-2", "--lora-r", "4",
                "--logging-steps", "4")  # fmt: skip
    train, _, _ = records(output)
    assert train[-1]["loss"] < train[0]["loss"]
    assert (output / "adapter" / "adapter_config.json").is_file()
    model, _, _ = load_reward_model(output)
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_ensemble_writes_members_and_index(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(64))
    output = rm(tiny_model, data, tmp_path / "out", "--max-steps", "4", "--learning-rate", "1e-3", "--ensemble", "2",
                "--eval-split", "0.25")  # fmt: skip
    index = json.loads((output / "ensemble.json").read_text())
    assert index == {"members": ["member-0", "member-1"], "seeds": [3, 4]}
    for name in index["members"]:
        member = output / name
        files = {p.name for p in member.iterdir()}
        assert {"config.json", "model.safetensors", "reward_stats.json", "metrics.jsonl", "config.yaml"} <= files
        assert "eval/ece" in records(member)[2]
    members = load_reward_ensemble(output)
    assert len(members) == 2
    assert not torch.equal(members[0].model.score.weight, members[1].model.score.weight)  # seeds 3 and 4

    first = (output / "member-0" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(output / "member-1")  # as if the run had stopped before the second member
    rm(tiny_model, data, output, "--max-steps", "4", "--learning-rate", "1e-3", "--ensemble", "2",
       "--eval-split", "0.25", "--resume")  # fmt: skip
    assert (output / "member-0" / "model.safetensors").stat().st_mtime_ns == first  # finished: skipped
    again = load_reward_ensemble(output)[1].model.score.weight
    assert torch.equal(again, members[1].model.score.weight)  # retrained from scratch, identically


def test_ensemble_members_get_seeds_and_data_orders():
    config = RMConfig(model="m", data="d", output="o", seed=5, ensemble=3)
    shuffled = [member_config(config, i, Path("o")) for i in range(3)]
    assert [m.seed for m in shuffled] == [5, 6, 7] and [m.data_seed for m in shuffled] == [5, 6, 7]
    assert [m.output for m in shuffled] == [str(Path("o") / f"member-{i}") for i in range(3)]
    config.ensemble_shuffle, config.data_seed = False, 11
    assert [member_config(config, i, Path("o")).data_seed for i in range(3)] == [11, 11, 11]


def test_aggregate_by_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # 2 members, 2 sequences
    assert aggregate(scores, "mean").tolist() == [2.0, 4.0]
    assert aggregate(scores, "min").tolist() == [1.0, 2.0]
    assert aggregate(scores, "mean_minus_std", 0.5).tolist() == [1.5, 3.0]  # σ = 1, 2 (population)
    assert aggregate(scores, "uwo", 0.5).tolist() == [1.5, 2.0]  # σ² = 1, 4
    with pytest.raises(UserError, match="unknown aggregation 'max'"):
        aggregate(scores, "max")


def test_expected_calibration_error_by_hand():
    probs = [0.95, 0.91, 0.75, 0.35, 0.55]
    labels = [1, 0, 0, 0, 1]
    # confidence .95 .91 .75 .65 .55, correct 1 0 0 1 1; bins (.9,1]: acc 1/2 vs conf .93; (.7,.8]: 0 vs .75;
    # (.6,.7]: 1 vs .65; (.5,.6]: 1 vs .55 -> (2·.43 + .75 + .35 + .45) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.482)
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.25], [0]) == pytest.approx(expected_calibration_error([0.75], [1]))


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_input_gives_one_line(tiny_model, tmp_path):
    out = tmp_path / "out"
    completions = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 16)
    assert "rm needs preference data" in one_line_error(lambda: rm(tiny_model, completions, out))
    margins = [{**r, "margin": 1.0} for r in preference_rows(16)]
    margins[4]["margin"] = "big"
    bad_margin = one_line_error(lambda: rm(tiny_model, write_jsonl(tmp_path / "m.jsonl", margins), out))
    assert "row 5: column 'margin': expected a finite number" in bad_margin
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    assert "--ensemble must be at least 1" in one_line_error(lambda: rm(tiny_model, pairs, out, "--ensemble", "0"))
    negative = one_line_error(lambda: rm(tiny_model, pairs, out, "--center-rewards-coefficient", "-1"))
    assert "--center-rewards-coefficient must be non-negative" in negative
    assert not out.exists()
    assert "not a reward model" in one_line_error(lambda: load_reward_model(tiny_model))
    assert "no ensemble.json" in one_line_error(lambda: load_reward_ensemble(tiny_model))
    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6]])
    assert "has no `score` head" in one_line_error(lambda: reward_scores(causal_lm, ids, torch.ones_like(ids)))
