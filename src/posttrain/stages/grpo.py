"""Critic-free RL: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024).

Per iteration: sample k completions for each prompt; score them; each completion's advantage
compares its score with the other completions of its prompt (GRPO: normalised by the group's
mean and std; RLOO: minus the mean of the other k−1), the same for every token; then
``ppo_epochs`` passes of the clipped policy loss plus β·KL_k3 to the frozen reference in the
loss, averaged over all completion tokens of the mini-batch. No value model. The
implementation details and their sources are listed in docs/grpo.md and docs/rloo.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.config import option
from posttrain.errors import UserError
from posttrain.ops import rl
from posttrain.stages import common
from posttrain.stages.rl_common import (
    RLConfig,
    completion_metrics,
    decode,
    reference_log_probs,
    sample_rows,
    score,
    set_up,
)
from posttrain.stages.rl_monitor import RLMonitor
from posttrain.training.loop import Batch, LossOutput
from posttrain.training.output import claim_output
from posttrain.training.rl_loop import Experience, run_rl
from posttrain.training.rollout import Rollout, batched_log_probs, response_log_probs, response_logits, sample

ADVANTAGES = {
    "grpo": lambda scores, k, config: rl.grpo_advantages(scores, k, scale=config.scale_rewards),
    "rloo": lambda scores, k, config: rl.rloo_advantages(scores, k),
}


@dataclass
class GRPOConfig(RLConfig):
    num_generations: int = option(4, "completions sampled per prompt (the group)")
    ppo_epochs: int = option(1, "optimisation passes over each rollout (GRPO's μ)")
    kl_coef: float = option(0.04, "β: weight of the KL_k3 term to the reference in the loss")
    scale_rewards: bool = option(True, "GRPO only: divide by the group's std (--no-scale-rewards: Dr. GRPO)")
    advantage: Literal["grpo", "rloo"] = option("grpo", "advantage estimator")

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise UserError(f"--num-generations must be at least 2 for a group baseline, got {self.num_generations}")


@dataclass
class RLOOConfig(GRPOConfig):
    advantage: Literal["grpo", "rloo"] = option("rloo", "advantage estimator")


def make_experience(model, rows, *, tokenizer, reward, reference, config: GRPOConfig) -> Experience:
    """k completions per prompt (group-major), their scores and group-relative advantages."""
    k = config.num_generations
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    rollout = sample(model, [p for p in rows["prompt_ids"] for _ in range(k)], tokenizer, config)
    old_logps = batched_log_probs(model, rollout, config.temperature, config.batch_size)
    ref_logps = reference_log_probs(reference, rollout, config)
    completions = decode(rollout, tokenizer)
    scores = score(reward, prompts, completions, rollout, config)
    advantages = ADVANTAGES[config.advantage](scores, k, config)  # (N,)
    mask = rollout.response_mask
    kl_total = (rl.kl_k1(old_logps, ref_logps) * mask).sum(-1)
    spread = scores.view(-1, k).std(-1).mean().item()
    metrics = completion_metrics(rollout, scores) | {
        "objective/kl": kl_total.mean().item(),
        "objective/score_std": spread,
    }
    n = len(scores)
    tensors = {"sequences": rollout.sequences, "attention": rollout.attention, "response_mask": mask,
               "ended": rollout.ended, "prompt_length": torch.full((n,), rollout.prompt_length),
               "old_logprobs": old_logps, "ref_logprobs": ref_logps,
               "advantages": advantages[:, None].expand_as(old_logps).contiguous(),
               "n_targets": mask.sum(-1), "n_tokens": rollout.attention.sum(-1)}  # fmt: skip
    samples = sample_rows(prompts, completions, scores, config.samples_per_log)
    return Experience(tensors, metrics, samples, prompts, completions, scores)


def group_loss(model, batch: Batch, *, config: GRPOConfig) -> LossOutput:
    """Clipped policy loss + β·KL_k3(π‖π_ref), both summed over the micro-batch's completion tokens."""
    rollout = Rollout.from_batch(batch)
    mask = rollout.response_mask
    logps = response_log_probs(response_logits(model, rollout), rollout, config.temperature)
    pg, clipfrac, approxkl = rl.clipped_policy_loss(logps, batch["old_logprobs"], batch["advantages"], mask,
                                                    config.cliprange)  # fmt: skip
    kl = rl.masked_mean(rl.kl_k3(logps, batch["ref_logprobs"]), mask)
    n = mask.sum()  # masked means x token count = token sums: the loop normalises over the global batch
    metrics = {"policy/approxkl": approxkl, "policy/clipfrac": clipfrac, "policy/kl_k3": kl.detach()}
    return LossOutput((pg + config.kl_coef * kl) * n, {k: v * n for k, v in metrics.items()})


def run_grpo(config: GRPOConfig) -> Path:
    """Train per ``config`` (GRPO or RLOO by ``config.advantage``); returns the output directory."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        s = set_up(config, accelerator)
        experience = functools.partial(make_experience, tokenizer=s.tokenizer, reward=s.reward,
                                       reference=s.reference, config=config)  # fmt: skip
        monitor = RLMonitor(config, s, out.work, policy_of=lambda model: model)
        policy = run_rl(s.policy, s.prompts, experience, functools.partial(group_loss, config=config), config,
                        accelerator, out.work, {}, monitor)  # fmt: skip
        common.save_final(policy, s.tokenizer, out.work, accelerator)
        out.commit(accelerator)
    return out.final
