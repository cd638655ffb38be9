"""What PPO, GRPO and RLOO share: their options, prompts, reference, and scoring of completions."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from posttrain.config import TrainConfig, flag, option, require
from posttrain.data.loading import load_rows
from posttrain.errors import UserError
from posttrain.models.loading import load_model
from posttrain.models.reference import Reference
from posttrain.rewards import Reward, parse_reward
from posttrain.stages import common
from posttrain.training.loop import make_plan
from posttrain.training.rl_loop import updates_per_iteration
from posttrain.training.rollout import Rollout, batched_log_probs, group_log_probs, tokenize_prompts

logger = logging.getLogger(__name__)


@dataclass
class RLConfig(TrainConfig):
    learning_rate: float = option(1e-6, "peak learning rate of AdamW")
    max_steps: int = option(-1, "iterations (rollout + optimisation) to run; -1 means --epochs passes over the prompts")
    max_length: int = option(512, "longest prompt in tokens (--truncation: cut to its last N tokens, or drop it)")
    prompts: str = option("", "prompts: any data file with a 'prompt' column (--data works too)")
    reward: str = option(
        "", "reward: a reward-model dir, an ensemble dir, module:function, or a weighted sum (a + 0.5*b)"
    )
    ref: str = option("", "reference model (default: the starting policy; with LoRA, the base with adapters off)")
    rollout_prompts: int = option(16, "prompts sampled per process per iteration")
    num_generations: int = option(1, "completions sampled per prompt")
    ppo_epochs: int = option(4, "optimisation passes over each rollout")
    max_new_tokens: int = option(64, "longest completion")
    sampler: Literal["fast", "generate"] = option(
        "fast", "fast: own KV-cache decode loop, one prefill per group (same tokens); generate: Hugging Face generate"
    )
    temperature: float = option(0.7, "sampling temperature (log-probs are computed with the same temperature)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    cliprange: float = option(0.2, "PPO ratio clipping ε")
    kl_coef: float = option(0.05, "β: weight of the KL penalty to the reference")
    missing_eos_penalty: float = option(1.0, "subtracted from the score of completions that never emit EOS")
    reward_clip: float = option(10.0, "scores are clipped to [-c, c] after normalisation")
    ensemble_aggregate: Literal["mean", "min", "mean_minus_std", "uwo"] = option(
        "mean", "how an ensemble combines members: mean, min, mean − λ·std, or uwo: mean − λ·variance"
    )
    ensemble_lambda: float = option(
        1.0, "λ of mean_minus_std and uwo", needs="ensemble_aggregate", needs_one_of=("mean_minus_std", "uwo")
    )
    gold_reward: str = option("", "a trusted reward that only measures, never trains: --reward's grammar")
    gold_every: int = option(
        1, "score rollouts with --gold-reward every N iterations (the first and last always)", needs="gold_reward"
    )
    eval_prompts: str = option("", "held-out prompts, sampled every --eval-steps iterations, scored by proxy and gold")
    stop_on_overoptimisation: bool = option(
        False, "end the run when the gold reward falls while the proxy keeps rising (needs --gold-reward)"
    )
    onset_window: int = option(5, "gold-scored iterations averaged by the over-optimisation detector")
    onset_z: float = option(
        3.0, "the smoothed gold must fall below its best by z standard errors (widened per look)", needs="gold_reward"
    )
    kl_budget: float = option(0.0, "warn when the KL to the reference passes N nats per completion (0: no budget)")
    save_steps: int = option(50, "write a resumable checkpoint every N iterations (0: only at the end)")
    logging_steps: int = option(1, "write metrics every N iterations")
    sample_steps: int = option(10, "write sample completions to OUTPUT/samples.jsonl every N iterations")
    samples_per_log: int = option(4, "completions written each time")
    HELD_OUT: ClassVar[tuple[str, ...]] = ("eval_prompts",)  # what --eval-steps samples

    def validate(self) -> None:
        if self.prompts and self.data and self.prompts != self.data:
            raise UserError("give the prompts with --prompts or --data, not both")
        self.data = self.data or self.prompts
        self.prompts = self.data
        super().validate()
        if not self.reward:
            raise UserError("--reward is required (or set `reward:` in the config file)")
        for name in ("rollout_prompts", "num_generations", "ppo_epochs", "max_new_tokens", "sample_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_data or self.eval_split:
            raise UserError("the RL stages take held-out prompts with --eval-prompts, not --eval-data / --eval-split")
        if self.stop_on_overoptimisation and not self.gold_reward:
            raise UserError("--stop-on-overoptimisation needs --gold-reward: without a gold reward nothing tells "
                            "over-optimisation from progress")  # fmt: skip
        if self.lora_dropout != {f.name: f.default for f in dataclasses.fields(self)}["lora_dropout"]:
            raise UserError("--lora-dropout has no effect in the RL stages: dropout is off, so that the log-probs "
                            "of the rollout and of the update agree")  # fmt: skip
        for name in ("gold_every", "onset_window"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        require(self, "onset_z", self.onset_z > 0, "positive")
        require(self, "kl_budget", self.kl_budget >= 0, "non-negative")
        for name in ("temperature", "cliprange", "reward_clip"):
            require(self, name, getattr(self, name) > 0, "positive")
        for name in ("kl_coef", "ensemble_lambda"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]")


@dataclass
class RLSetup:
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    prompts: Any  # tokenized prompts (datasets.Dataset)
    reward: Reward
    gold: Reward | None  # --gold-reward: scores rollouts, never enters the update
    eval_prompts: Any  # --eval-prompts, tokenized (datasets.Dataset), or None
    policy: Any
    reference: Reference


def set_up(config: RLConfig, accelerator: Accelerator) -> RLSetup:
    """In order: seed, tokenizer, prompts, held-out prompts, reward, gold reward, policy, reference."""
    set_seed(config.seed)
    tokenizer = common.load_stage_tokenizer(config)
    prompts = load_prompts(config, tokenizer, accelerator)
    make_plan(len(prompts), config, accelerator.num_processes, config.rollout_prompts)  # too few: before loading
    updates_per_iteration(config, config.rollout_prompts * config.num_generations)
    held_out = load_prompts(config, tokenizer, accelerator, config.eval_prompts) if config.eval_prompts else None
    reward = load_rl_reward(config, accelerator)
    gold = load_rl_reward(config, accelerator, "gold_reward") if config.gold_reward else None
    policy = common.load_trainable(config)
    reference = load_rl_reference(config, policy, accelerator)
    return RLSetup(accelerator, tokenizer, prompts, reward, gold, held_out, policy, reference)


def load_prompts(config: RLConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator, source: str = ""):
    """The training prompts (``--prompts``/``--data``), or the prompts of the file ``source``, tokenized
    and fitted to ``--max-length`` as ``--truncation`` says."""
    with accelerator.main_process_first():
        rows = load_rows(source, "train") if source else common.load_splits(config)[0]
        tokenized = tokenize_prompts(rows, tokenizer, sys.maxsize, source or config.data)  # whole: drop needs it
        return fit_prompts(tokenized, config.max_length, config.truncation, source or config.data)


def fit_prompts(tokenized, max_length: int, truncation: str, source: str):
    """Prompts over ``max_length`` tokens cut to their last ``max_length`` (the end of a prompt is what
    the completion continues) or, with ``--truncation drop``, left out; says how many."""
    too_long = sum(1 for n in tokenized["length"] if n > max_length)
    if not too_long:
        return tokenized
    if truncation == "drop":
        if too_long == len(tokenized):
            raise UserError(f"{source}: every prompt is longer than --max-length {max_length}; raise it")
        logger.warning("%s: dropped %d of %d prompts longer than --max-length %d", source, too_long,
                       len(tokenized), max_length)  # fmt: skip
        return tokenized.filter(lambda n: n <= max_length, input_columns="length")
    logger.warning("%s: cut %d of %d prompts to their last %d tokens", source, too_long, len(tokenized), max_length)
    return tokenized.map(lambda ids: {"prompt_ids": ids[-max_length:], "length": min(len(ids), max_length)},
                         input_columns="prompt_ids")  # fmt: skip


def load_rl_reference(config: RLConfig, policy, accelerator: Accelerator) -> Reference:
    """The frozen reference: the policy with LoRA adapters off, or a frozen copy of ``--ref`` / the start."""
    if config.lora_r and not config.ref:
        return Reference(policy, adapters_off=True)
    flag = "--ref" if config.ref else "--model"
    model = load_model(config.ref or config.model, trust_remote_code=config.trust_remote_code, flag=flag)
    return Reference(model.eval().requires_grad_(False).to(accelerator.device))


def reference_log_probs(reference: Reference, rollout: Rollout, config: RLConfig, group_size: int = 1) -> torch.Tensor:
    """Per-token log-probs of the responses under the reference (batched, no gradient); rows in groups of
    ``group_size`` > 1 with one prompt (group-major) have that prompt run once per group. (N, R)"""
    off = reference.model.disable_adapter() if reference.adapters_off else contextlib.nullcontext()
    with off:
        if group_size > 1:
            return group_log_probs(reference.model, rollout, group_size, config.temperature, config.batch_size)
        return batched_log_probs(reference.model, rollout, config.temperature, config.batch_size)


def load_rl_reward(config: RLConfig, accelerator: Accelerator, name: str = "reward") -> Reward:
    """The reward a spec option (``reward`` or ``gold_reward``) names; its errors name that option."""
    return parse_reward(getattr(config, name), config.batch_size, accelerator.device, config.ensemble_aggregate,
                        config.ensemble_lambda, flag(name))  # fmt: skip


def decode(rollout: Rollout, tokenizer) -> list[str]:
    """Each response up to its first EOS, as text (special tokens dropped): what every reward reads."""
    kept = [row[mask.bool()] for row, mask in zip(rollout.responses, rollout.response_mask, strict=True)]
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


def score(reward: Reward, prompts: list[Any], completions: list[str], rollout: Rollout, config: RLConfig):
    """Reward of each completion, minus the missing-EOS penalty, clipped. (N,)"""
    scores = reward(prompts, completions).to(rollout.sequences.device)
    scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
    return scores.clamp(-config.reward_clip, config.reward_clip)


def sample_rows(prompts: list[Any], completions: list[str], scores: torch.Tensor, count: int) -> list[dict]:
    """The first ``count`` (prompt, completion, score) rows of a rollout, for OUTPUT/samples.jsonl."""
    rows = zip(prompts[:count], completions[:count], scores[:count].tolist(), strict=True)
    return [{"prompt": p, "completion": c, "score": x} for p, c, x in rows]


def completion_metrics(rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
    return {
        "objective/scores": scores.mean().item(),
        "completions/mean_length": rollout.response_mask.sum(-1).float().mean().item(),
        "completions/eos_fraction": rollout.ended.float().mean().item(),
    }
