"""Set-up every stage shares: accelerator, output directory, data splits, model, final save.

Plain functions, no base class: a stage module calls the ones it needs, in order.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain import config as config_io
from posttrain.config import TrainConfig
from posttrain.data.loading import load_rows
from posttrain.errors import UserError
from posttrain.models.loading import add_lora, is_peft, load_model, load_tokenizer
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


def check_output(config: TrainConfig) -> Path:
    """Refuse to touch a non-empty OUTPUT unless resuming or told to overwrite (checked before any work)."""
    output = Path(config.output)
    non_empty = output.is_dir() and any(output.iterdir())
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: exists and is not a directory")
    if config.resume and not non_empty:
        raise UserError(f"--resume: {output} holds no earlier run to resume")
    if non_empty and not (config.resume or config.overwrite):
        raise UserError(f"--output {output}: directory is not empty; pass --overwrite to replace it or --resume")
    return output


def open_output(config: TrainConfig, accelerator: Accelerator, trackers: bool = True) -> Path:
    """Clear (with --overwrite) and create OUTPUT, save the resolved config, start trackers.

    Every process has passed ``check_output`` at its start; the barrier keeps the main
    process from creating OUTPUT before the others have checked it.
    """
    output = Path(config.output)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config.overwrite and output.is_dir():
            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
        config_io.save(config, output / "config.yaml")
    accelerator.wait_for_everyone()
    if trackers:  # a reward ensemble's directory has none: each member starts its own
        accelerator.init_trackers(output.name, config=dataclasses.asdict(config))
    return output


def load_splits(config: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training rows and held-out rows (from --eval-data, or split off with --eval-split)."""
    rows = load_rows(config.data, config.data_split)
    if config.eval_data:
        return rows, load_rows(config.eval_data, config.data_split)
    if config.eval_split:
        parts = rows.train_test_split(test_size=config.eval_split, seed=config.seed)
        return parts["train"], parts["test"]
    return rows, None


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
