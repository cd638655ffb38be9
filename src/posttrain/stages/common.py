"""Set-up every stage shares: accelerator, data splits, model, final save.

Plain functions, no base class: a stage module calls the ones it needs, in order.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config import TrainConfig
from posttrain.data.loading import load_rows
from posttrain.errors import UserError
from posttrain.models.loading import add_lora, is_peft, load_model, load_tokenizer
from posttrain.training.loop import Batches
from posttrain.training.metrics import tracker_for

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One accelerator per run; only the main process prints warnings.

    Without a GPU (or other accelerator) ``cpu=True`` makes several launched processes
    (``accelerate launch --multi_gpu`` or ``torchrun``) train data-parallel over gloo;
    accelerate otherwise runs each of them alone.
    """
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=tracker_for(config.report_to),
    )
    if not accelerator.is_main_process:
        logging.getLogger("posttrain").setLevel(logging.ERROR)
    return accelerator


def load_splits(config: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training rows and held-out rows (from --eval-data, or split off with --eval-split)."""
    rows = load_rows(config.data, config.data_split)
    if config.eval_data:
        return rows, load_rows(config.eval_data, config.data_split)
    if config.eval_split:
        held_out = math.ceil(config.eval_split * len(rows))  # as datasets' train_test_split rounds
        if held_out >= len(rows):
            raise UserError(
                f"--eval-split {config.eval_split}: {config.data} has {len(rows)} rows; holding out {held_out} "
                "leaves none to train on"
            )
        parts = rows.train_test_split(test_size=config.eval_split, seed=config.seed)
        return parts["train"], parts["test"]
    return rows, None


def prepare_splits(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, prepare) -> tuple[Batches, Batches | None]:
    """The training and held-out splits, each through the stage's ``prepare(rows, source, tokenizer, config)``."""
    train_rows, eval_rows = load_splits(config)
    train_data = prepare(train_rows, config.data, tokenizer, config)
    if eval_rows is None:
        return train_data, None
    return train_data, prepare(eval_rows, config.eval_data or config.data, tokenizer, config)


def load_trainable(config: TrainConfig) -> PreTrainedModel:
    """The model to train: full weights, or frozen weights plus LoRA adapters."""
    model = load_model(config.model, trust_remote_code=config.trust_remote_code)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # LoRA: checkpointed blocks need an input that requires grad
    if config.lora_r:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    return model


def load_stage_tokenizer(config: TrainConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


def save_final(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path, accelerator: Accelerator
) -> None:
    """OUTPUT becomes a Hugging Face checkpoint; LoRA adapters are kept in OUTPUT/adapter and merged.

    Trackers are closed, but the process group stays up (not ``end_training``): a process may
    train again, as the members of a reward ensemble do.
    """
    if accelerator.is_main_process:
        if is_peft(model):
            model.save_pretrained(output / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
