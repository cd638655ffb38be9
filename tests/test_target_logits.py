"""Logits only where targets are (posttrain.ops.logprobs.target_logits): the SFT and DPO losses and
their gradients equal the full computation over every position, with padding and with LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import preference_rows, qa_rows, write_jsonl
from posttrain.data.loading import load_rows
from posttrain.models.loading import add_lora, load_tokenizer
from posttrain.models.reference import Reference, completion_logps
from posttrain.ops.logprobs import IGNORE_INDEX, first_target_position, sequence_log_probs
from posttrain.ops.losses import shifted_correct_sum, shifted_nll_sum
from posttrain.stages import dpo, sft

X = IGNORE_INDEX


def test_first_target_position_by_hand():
    # row 0: tokens 2 and 3 are targets, predicted from positions 1 and 2; row 1: token 3, from position 2
    labels = torch.tensor([[X, X, 5, 6, X], [X, X, X, 7, X]])
    assert first_target_position(labels) == 1
    assert first_target_position(torch.tensor([[X, X, X, 4]])) == 2
    assert first_target_position(torch.tensor([[X, X, X]])) == 2  # no target: a window of the last position
    assert first_target_position(torch.tensor([[1, 2, 3]])) == 0  # every token a target: nothing to skip


def tiny_policy(tiny_model: Path, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        for name, weight in model.named_parameters():  # non-zero B matrices: the adapters change the output
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.1)
    return model


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(windowed: dict, full: dict) -> None:
    assert windowed.keys() == full.keys() and full
    for name, value in full.items():
        torch.testing.assert_close(windowed[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_loss_and_gradients_equal_the_full_logits(tiny_model, tmp_path, lora):
    config = sft.SFTConfig(model=str(tiny_model), data=str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))))
    data = sft.prepare(load_rows(config.data), config.data, load_tokenizer(str(tiny_model)), config)
    batch = data.collate(data.dataset[:])  # 8 rows of different lengths: right padding
    assert (batch["attention_mask"] == 0).any()
    assert first_target_position(batch["labels"]) > 0  # a prompt window is skipped
    model = tiny_policy(tiny_model, lora)

    out = sft.sft_loss(model, batch)
    out.loss_sum.backward()
    windowed = grads(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # every position
    full_loss, _ = shifted_nll_sum(logits, batch["labels"])
    full_loss.backward()

    torch.testing.assert_close(out.loss_sum, full_loss, rtol=1e-6, atol=0)
    assert out.metric_sums["mean_token_accuracy"] == shifted_correct_sum(logits, batch["labels"])
    assert_same_grads(windowed, grads(model))


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_logps_and_gradients_equal_the_full_logits(tiny_model, tmp_path, lora):
    config = dpo.DPOConfig(model=str(tiny_model), data=str(write_jsonl(tmp_path / "p.jsonl", preference_rows(6))))
    data = dpo.prepare(load_rows(config.data), config.data, load_tokenizer(str(tiny_model)), config)
    batch = data.collate(data.dataset[:])  # 12 rows: chosen then rejected, padded
    model = tiny_policy(tiny_model, lora)

    logps, tokens = completion_logps(model, batch)
    logps.sum().backward()
    windowed = grads(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full_logps, full_tokens = sequence_log_probs(logits, batch["labels"])
    full_logps.sum().backward()

    torch.testing.assert_close(logps, full_logps, rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, full_tokens)
    assert_same_grads(windowed, grads(model))
    if lora:  # the reference is the same model with its adapters off
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        base_logps, _ = sequence_log_probs(base(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                           batch["labels"])  # fmt: skip
        torch.testing.assert_close(Reference(model, adapters_off=True).logps(batch), base_logps.detach(),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
