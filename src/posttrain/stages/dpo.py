"""Preference optimisation: DPO and its family (cDPO, rDPO, IPO, SLiC hinge, SimPO, ORPO, KTO).

In order: load the tokenizer and the preference rows (paired, or unpaired for KTO), validate
and tokenize them, load the policy (optionally with LoRA) and the frozen reference (a copy,
or the policy with adapters off; none for the reference-free SimPO and ORPO), optionally
compute the reference's log-probs once and cache them, train with the shared loop on the
registered loss, save a Hugging Face checkpoint. Losses are normalised per pair (per example
for KTO) over the whole global batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from posttrain.config import TrainConfig, option, require
from posttrain.data.formats import detect_format, require_format, validate_rows
from posttrain.data.preference import collate_pairs, collate_unpaired, tokenize_preferences
from posttrain.errors import UserError
from posttrain.models.loading import load_model
from posttrain.models.reference import Reference, completion_logps, with_reference_logps
from posttrain.ops.preference import (
    PAIRED_LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogProbs,
    kto_loss,
    pair_metric_sums,
    rpo_nll,
)
from posttrain.stages import common
from posttrain.training.loop import Batch, Batches, LossOutput, make_plan, train
from posttrain.training.output import claim_output

LossName = Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"]


@dataclass
class DPOConfig(TrainConfig):
    learning_rate: float = option(1e-6, "peak learning rate of AdamW")
    group_by_length: bool = option(True, "batch examples of similar length together to waste less padding")
    loss: LossName = option("sigmoid", "preference loss (kto needs unpaired prompt/completion/label data)")
    beta: float = option(0.1, "β: inverse temperature of the implicit reward (ORPO: weight λ of the odds ratio)")
    label_smoothing: float = option(
        0.0, "ε: label smoothing of cdpo, in [0, 0.5]; label-noise rate of robust, in [0, 0.5)"
    )
    simpo_gamma: float = option(0.5, "γ: SimPO's target reward margin", needs="loss", needs_one_of=("simpo",))
    rpo_alpha: float = option(0.0, "α: weight of the chosen answer's NLL added to the loss (RPO); 0 disables it")
    desirable_weight: float = option(
        1.0, "KTO's λ_D, weight of desirable examples", needs="loss", needs_one_of=("kto",)
    )
    undesirable_weight: float = option(
        1.0, "KTO's λ_U, weight of undesirable examples", needs="loss", needs_one_of=("kto",)
    )
    ref: str = option("", "reference model (default: the starting model; with LoRA, the base with adapters off)")
    precompute_ref: bool = option(False, "compute the reference log-probs once, cache them on disk, reuse them")
    cache_dir: str = option("~/.cache/posttrain", "where --precompute-ref keeps reference log-probs")

    def validate(self) -> None:
        super().validate()
        require(self, "beta", self.beta > 0, "positive")
        for name in ("rpo_alpha", "desirable_weight", "undesirable_weight"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        cache = Path(self.cache_dir).expanduser()
        if self.precompute_ref and cache.exists() and not cache.is_dir():
            raise UserError(f"--cache-dir {self.cache_dir}: exists and is not a directory")
        high = {"cdpo": 0.5, "robust": 0.5 - 1e-9}.get(self.loss)
        if high is None and self.label_smoothing:
            raise UserError(f"--label-smoothing applies to cdpo and robust only, not to --loss {self.loss}")
        if high is not None and not 0.0 <= self.label_smoothing <= high:
            bound = "0.5]" if self.loss == "cdpo" else "0.5)"
            raise UserError(f"--label-smoothing for {self.loss} must be in [0, {bound}, got {self.label_smoothing}")
        if self.loss in REFERENCE_FREE and (self.ref or self.precompute_ref):
            raise UserError(f"--loss {self.loss} is reference-free; drop --ref and --precompute-ref")


def paired_loss(model, batch: Batch, reference: Reference | None, config: DPOConfig) -> LossOutput:
    """Summed pair losses (+ RPO's NLL term) and TRL's metrics; chosen rows first, then rejected."""
    logps, tokens = completion_logps(model, batch)  # (2B,), (2B,)
    ref = batch["ref_logps"] if "ref_logps" in batch else reference.logps(batch) if reference else None
    b = len(logps) // 2
    lp = PairLogProbs(logps[:b], logps[b:], tokens[:b], tokens[b:], *((ref[:b], ref[b:]) if ref is not None else ()))
    losses = PAIRED_LOSSES[config.loss](lp, LossParams(config.beta, config.label_smoothing, config.simpo_gamma))
    if config.rpo_alpha:
        losses = losses + config.rpo_alpha * rpo_nll(lp)
    return LossOutput(losses.sum(), pair_metric_sums(lp, config.beta))


def unpaired_loss(model, batch: Batch, reference: Reference | None, config: DPOConfig) -> LossOutput:
    """KTO's summed losses; metrics: the mean log-ratio ``kl`` and the policy's log-probs."""
    logps, _ = completion_logps(model, batch)  # (B,)
    ref = batch["ref_logps"] if "ref_logps" in batch else reference.logps(batch)
    desirable = batch["desirable"]
    losses = kto_loss(logps, ref, desirable, config.beta, config.desirable_weight, config.undesirable_weight)
    ratio = (logps - ref).detach()
    return LossOutput(losses.sum(), {"kl": ratio.sum(), "logps": logps.detach().sum()})


def prepare(rows: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, config: DPOConfig) -> Batches:
    """Validate and tokenize one split for the chosen loss (paired, or unpaired for KTO)."""
    fmt = detect_format(rows, source)
    wanted = "unpaired_preference" if config.loss == "kto" else "preference"
    require_format(fmt, (wanted,), source, f"dpo --loss {config.loss}", rows.column_names)
    validate_rows(rows, fmt, source)
    tokenized = tokenize_preferences(rows, fmt, tokenizer, config.max_length, config.truncation, source)
    collate = collate_unpaired if config.loss == "kto" else collate_pairs
    return Batches(tokenized, functools.partial(collate, pad_id=tokenizer.pad_token_id))


def load_reference(config: DPOConfig, policy, accelerator: Accelerator) -> Reference | None:
    """None for reference-free losses; the LoRA policy with adapters off; else a frozen copy."""
    if config.loss in REFERENCE_FREE:
        return None
    if config.lora_r and not config.ref:
        return Reference(policy, adapters_off=True)
    flag = "--ref" if config.ref else "--model"
    model = load_model(config.ref or config.model, trust_remote_code=config.trust_remote_code, flag=flag)
    return Reference(model.eval().requires_grad_(False).to(accelerator.device))


def cache_reference(data: Batches, reference: Reference, config: DPOConfig, accelerator: Accelerator) -> Batches:
    columns = ("prompt_ids", "completion_ids") if config.loss == "kto" else ("prompt_ids", "chosen_ids", "rejected_ids")
    dataset = with_reference_logps(
        data.dataset, data.collate, reference, columns, config.batch_size, config.cache_dir, accelerator.device
    )
    return Batches(dataset, data.collate)


def run_dpo(config: DPOConfig) -> Path:
    """Train per ``config``; returns the output directory (a Hugging Face checkpoint)."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        set_seed(config.seed)
        tokenizer = common.load_stage_tokenizer(config)
        with accelerator.main_process_first():
            train_data, eval_data = common.prepare_splits(config, tokenizer, prepare)
        make_plan(len(train_data.dataset), config, accelerator.num_processes)  # a batch too big: before loading
        model = common.load_trainable(config)
        reference = load_reference(config, model, accelerator)
        if config.precompute_ref and reference is not None:
            with accelerator.main_process_first():  # the main process computes, the others read its cache
                train_data = cache_reference(train_data, reference, config, accelerator)
                eval_data = eval_data and cache_reference(eval_data, reference, config, accelerator)
            reference = None  # every batch now carries its reference log-probs
        loss = unpaired_loss if config.loss == "kto" else paired_loss
        model = train(model, train_data, eval_data, functools.partial(loss, reference=reference, config=config),
                      config, accelerator, out.work)  # fmt: skip
        common.save_final(model, tokenizer, out.work, accelerator)
        out.commit(accelerator)
    return out.final
