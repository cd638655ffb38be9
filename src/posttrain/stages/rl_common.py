"""What PPO, GRPO and RLOO share: their options, prompts, reference, and scoring of completions."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from posttrain.config import TrainConfig, option, require
from posttrain.errors import UserError
from posttrain.models.loading import load_model
from posttrain.models.reference import Reference
from posttrain.rewards import Reward, parse_reward
from posttrain.stages import common
from posttrain.training.rl_loop import rl_plan, updates_per_iteration
from posttrain.training.rollout import Rollout, batched_log_probs, tokenize_prompts


@dataclass
class RLConfig(TrainConfig):
    learning_rate: float = option(1e-6, "peak learning rate of AdamW")
    max_steps: int = option(-1, "iterations (rollout + optimisation) to run; -1 means --epochs passes over the prompts")
    max_length: int = option(512, "prompts are cut to their last N tokens")
    prompts: str = option("", "prompts: any data file with a 'prompt' column (--data works too)")
    reward: str = option(
        "", "reward: a reward-model dir, an ensemble dir, module:function, or a weighted sum (a + 0.5*b)"
    )
    ref: str = option("", "reference model (default: the starting policy; with LoRA, the base with adapters off)")
    rollout_prompts: int = option(16, "prompts sampled per process per iteration")
    num_generations: int = option(1, "completions sampled per prompt")
    ppo_epochs: int = option(4, "optimisation passes over each rollout")
    max_new_tokens: int = option(64, "longest completion")
    temperature: float = option(0.7, "sampling temperature (log-probs are computed with the same temperature)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    cliprange: float = option(0.2, "PPO ratio clipping ε")
    kl_coef: float = option(0.05, "β: weight of the KL penalty to the reference")
    missing_eos_penalty: float = option(1.0, "subtracted from the score of completions that never emit EOS")
    reward_clip: float = option(10.0, "scores are clipped to [-c, c] after normalisation")
    ensemble_aggregate: Literal["mean", "min", "mean_minus_std", "uwo"] = option(
        "mean", "how an ensemble combines members: mean, min, mean − λ·std, or uwo: mean − λ·variance"
    )
    ensemble_lambda: float = option(1.0, "λ of mean_minus_std and uwo")
    save_steps: int = option(50, "write a resumable checkpoint every N iterations (0: only at the end)")
    logging_steps: int = option(1, "write metrics every N iterations")
    sample_steps: int = option(10, "write sample completions to OUTPUT/samples.jsonl every N iterations")
    samples_per_log: int = option(4, "completions written each time")

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
            raise UserError("the RL stages do not evaluate on held-out prompts; drop --eval-data / --eval-split")
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
    policy: Any
    reference: Reference


def set_up(config: RLConfig, accelerator: Accelerator) -> RLSetup:
    """In order: seed, tokenizer, prompts, reward, policy, reference."""
    set_seed(config.seed)
    tokenizer = common.load_stage_tokenizer(config)
    prompts = load_prompts(config, tokenizer, accelerator)
    rl_plan(len(prompts), config, accelerator.num_processes)  # too few prompts or a bad batch: before loading
    updates_per_iteration(config, config.rollout_prompts * config.num_generations)
    reward = load_rl_reward(config, accelerator)
    policy = common.load_trainable(config)
    return RLSetup(accelerator, tokenizer, prompts, reward, policy, load_rl_reference(config, policy, accelerator))


def load_prompts(config: RLConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator):
    with accelerator.main_process_first():
        rows, _ = common.load_splits(config)
        return tokenize_prompts(rows, tokenizer, config.max_length, config.data)


def load_rl_reference(config: RLConfig, policy, accelerator: Accelerator) -> Reference:
    """The frozen reference: the policy with LoRA adapters off, or a frozen copy of ``--ref`` / the start."""
    if config.lora_r and not config.ref:
        return Reference(policy, adapters_off=True)
    flag = "--ref" if config.ref else "--model"
    model = load_model(config.ref or config.model, trust_remote_code=config.trust_remote_code, flag=flag)
    return Reference(model.eval().requires_grad_(False).to(accelerator.device))


def reference_log_probs(reference: Reference, rollout: Rollout, config: RLConfig) -> torch.Tensor:
    """Per-token log-probs of the responses under the reference (batched, no gradient). (N, R)"""
    off = reference.model.disable_adapter() if reference.adapters_off else contextlib.nullcontext()
    with off:
        return batched_log_probs(reference.model, rollout, config.temperature, config.batch_size)


def load_rl_reward(config: RLConfig, accelerator: Accelerator) -> Reward:
    return parse_reward(config.reward, config.batch_size, accelerator.device,
                        config.ensemble_aggregate, config.ensemble_lambda)  # fmt: skip


def score(reward: Reward, prompts: list[Any], rollout: Rollout, tokenizer, config: RLConfig) -> torch.Tensor:
    """Reward of each completion, minus the missing-EOS penalty, clipped. (N,)"""
    kept = [row[mask.bool()] for row, mask in zip(rollout.responses, rollout.response_mask, strict=True)]
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
    scores = reward(prompts, texts).to(rollout.sequences.device)
    scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
    return scores.clamp(-config.reward_clip, config.reward_clip)


def sample_rows(prompts: list[Any], rollout: Rollout, scores: torch.Tensor, tokenizer, count: int) -> list[dict]:
    """The first ``count`` (prompt, completion, score) rows of a rollout, for OUTPUT/samples.jsonl."""
    rows = []
    for i in range(min(count, len(prompts))):
        completion = tokenizer.decode(rollout.responses[i][rollout.response_mask[i].bool()], skip_special_tokens=True)
        rows.append({"prompt": prompts[i], "completion": completion, "score": scores[i].item()})
    return rows


def completion_metrics(rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
    return {
        "objective/scores": scores.mean().item(),
        "completions/mean_length": rollout.response_mask.sum(-1).float().mean().item(),
        "completions/eos_fraction": rollout.ended.float().mean().item(),
    }
