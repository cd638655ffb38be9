"""The shared loop stops on a NaN loss before the update and keeps the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import qa_rows, write_jsonl
from posttrain.data.loading import load_rows
from posttrain.errors import UserError
from posttrain.models.loading import load_tokenizer
from posttrain.stages.sft import SFTConfig, prepare, sft_loss
from posttrain.training.checkpoint import latest_checkpoint, trainable_state
from posttrain.training.loop import LossOutput, train


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    config = SFTConfig(model=str(tiny_model), data=str(data), output=str(tmp_path / "out"), batch_size=4,
                       max_steps=10, save_steps=2, learning_rate=1e-3)  # fmt: skip
    batches = prepare(load_rows(config.data), config.data, load_tokenizer(config.model), config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    calls = []

    def diverging(model, batch):
        calls.append(1)
        out = sft_loss(model, batch)
        return LossOutput(out.loss_sum * (float("nan") if len(calls) == 5 else 1.0), out.metric_sums)

    (tmp_path / "out").mkdir()
    with pytest.raises(
        UserError, match=r"the loss is nan; stopped before the update. Last good checkpoint: .*step-00000004"
    ):
        train(model, batches, None, diverging, config, Accelerator(cpu=True), tmp_path / "out")
    checkpoint = latest_checkpoint(tmp_path / "out" / "checkpoints")
    saved = load_file(checkpoint / "model.safetensors")
    # the NaN step was not applied: the weights are those after step 4
    for name, tensor in trainable_state(model).items():
        assert torch.equal(saved[name], tensor), name
