"""Supervised fine-tuning (SFT): next-token loss on demonstrations, completion tokens only.

In order: load the tokenizer and the rows, validate and tokenize them (chat template for
conversations, EOS always in the loss), optionally pack short examples, load the model
(optionally with LoRA), train with the shared loop, save a Hugging Face checkpoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import datasets
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from posttrain.config import TrainConfig, option
from posttrain.data.collate import pack_dataset, pad_batch
from posttrain.data.formats import detect_format, require_format, validate_rows
from posttrain.data.tokenize import tokenize_dataset
from posttrain.ops.logprobs import target_logits
from posttrain.ops.losses import shifted_correct_sum, shifted_nll_sum
from posttrain.stages import common
from posttrain.training.loop import Batch, Batches, LossOutput, make_plan, train
from posttrain.training.output import claim_output

FORMATS = ("language_modeling", "prompt_completion")


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool = option(
        True, "loss on completions / assistant turns only; --no-completion-only-loss trains on every token"
    )
    packing: bool = option(False, "concatenate short examples into rows of --max-length tokens")


def sft_loss(model, batch: Batch) -> LossOutput:
    """Summed next-token NLL over completion tokens, and the number predicted right.

    Logits only from the batch's first position that predicts a target (no LM head over the prompts).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits, labels = target_logits(model, inputs, batch["labels"])  # (B, K, V), (B, K)
    loss_sum, _ = shifted_nll_sum(logits, labels)
    return LossOutput(loss_sum, {"mean_token_accuracy": shifted_correct_sum(logits, labels)})


def prepare(rows: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, config: SFTConfig) -> Batches:
    """Validate, tokenize and (optionally) pack one split."""
    fmt = detect_format(rows, source)
    require_format(fmt, FORMATS, source, "sft", rows.column_names)
    validate_rows(rows, fmt, source)
    tokenized = tokenize_dataset(
        rows, fmt, tokenizer, config.max_length, config.truncation, config.completion_only_loss, source
    )
    if config.packing:
        tokenized = pack_dataset(tokenized, config.max_length)
    return Batches(tokenized, functools.partial(pad_batch, pad_id=tokenizer.pad_token_id))


def run_sft(config: SFTConfig) -> Path:
    """Train per ``config``; returns the output directory (a Hugging Face checkpoint)."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        set_seed(config.seed)
        tokenizer = common.load_stage_tokenizer(config)
        with accelerator.main_process_first():  # one process tokenizes, the other reads the cache
            train_data, eval_data = common.prepare_splits(config, tokenizer, prepare)
        make_plan(len(train_data.dataset), config, accelerator.num_processes)  # a batch too big: before loading
        model = common.load_trainable(config)
        model = train(model, train_data, eval_data, sft_loss, config, accelerator, out.work)
        common.save_final(model, tokenizer, out.work, accelerator)
        out.commit(accelerator)
    return out.final
