"""Critic-free RL: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024).

Per iteration: sample k completions for each prompt; score them; each completion's advantage
compares its score with the other completions of its prompt (GRPO: normalised by the group's
mean and std; RLOO: minus the mean of the other k−1), the same for every token; then
``ppo_epochs`` passes of the clipped policy loss plus β·KL_k3 to the frozen reference in the
loss, averaged as ``--loss-type`` says (by default over all completion tokens of the
mini-batch). No value model. The variants (loss types, clip-higher, batch scaling, sequence-level
ratios, masking truncated completions, the soft over-long penalty) are pure functions in
``posttrain.ops.grpo_losses``. The implementation details and their sources are listed in
docs/grpo.md and docs/rloo.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.config import option, require
from posttrain.errors import UserError
from posttrain.ops import grpo_losses, rl
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
from posttrain.training.rl_loop import Experience, run_rl, updates_per_iteration
from posttrain.training.rollout import (
    Rollout,
    batched_log_probs,
    group_log_probs,
    group_response_logits,
    response_log_probs,
    response_logits,
)
from posttrain.training.sampler import SAMPLERS

# Each maps (this process's scores (N,), k, every score of the rollout on all processes) -> advantages (N,).
SCALED_ADVANTAGES = {
    "group": lambda scores, k, batch_scores: rl.grpo_advantages(scores, k, scale=True),
    "batch": lambda scores, k, batch_scores: grpo_losses.batch_scaled_advantages(scores, k, batch_scores),
    "none": lambda scores, k, batch_scores: rl.grpo_advantages(scores, k, scale=False),
}
ADVANTAGES = {
    "grpo": lambda scores, k, batch_scores, config: SCALED_ADVANTAGES[config.scale_rewards](scores, k, batch_scores),
    "rloo": lambda scores, k, batch_scores, config: rl.rloo_advantages(scores, k),
}
DAPO_OVERLONG_PENALTY = 1.0  # Yu et al. 2025: the penalty reaches −1 on rewards of ±1


@dataclass
class GRPOConfig(RLConfig):
    num_generations: int = option(4, "completions sampled per prompt (the group)")
    ppo_epochs: int = option(1, "optimisation passes over each rollout (GRPO's μ)")
    kl_coef: float = option(0.04, "β: weight of the KL_k3 term to the reference in the loss")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "GRPO only: divide the advantage by the group's std, the rollout's (Lite PPO) or none (Dr. GRPO)"
    )
    advantage: Literal["grpo", "rloo"] = option("grpo", "advantage estimator")
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = option(
        "dapo",
        "token losses averaged over the step's tokens (dapo), per completion (grpo), per micro-batch (bnpo), "
        "or over completions x --max-new-tokens (dr_grpo)",
    )
    epsilon_high: float = option(0.0, "upper clip: ratio clipped to [1 − cliprange, 1 + ε_high] (DAPO; 0: --cliprange)")
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token", "importance ratio per token, or per completion: the geometric mean of its tokens' (GSPO)"
    )
    mask_truncated_completions: bool = option(False, "leave completions that never emitted EOS out of the loss")
    overlong_buffer: int = option(
        0, "DAPO soft over-long penalty over the last N tokens before --max-new-tokens (0: off)"
    )
    overlong_penalty: float = option(DAPO_OVERLONG_PENALTY, "the over-long penalty at --max-new-tokens")

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise UserError(f"--num-generations must be at least 2 for a group baseline, got {self.num_generations}")
        if self.advantage == "rloo" and self.scale_rewards != "group":
            raise UserError("--scale-rewards applies to --advantage grpo only: the leave-one-out one is never scaled")
        if self.epsilon_high == 0:  # the default: symmetric clipping, written out so config.yaml shows the bound
            self.epsilon_high = self.cliprange
        if self.epsilon_high < self.cliprange:
            raise UserError(f"--epsilon-high must be at least --cliprange ({self.cliprange}), got {self.epsilon_high}: "
                            "clip-higher only raises the upper bound")  # fmt: skip
        require(self, "overlong_buffer", 0 <= self.overlong_buffer <= self.max_new_tokens,
                f"in [0, --max-new-tokens] = [0, {self.max_new_tokens}]")  # fmt: skip
        require(self, "overlong_penalty", self.overlong_penalty > 0, "positive")
        if self.overlong_penalty != DAPO_OVERLONG_PENALTY and not self.overlong_buffer:
            raise UserError("--overlong-penalty needs --overlong-buffer (the tokens over which the penalty grows)")


@dataclass
class RLOOConfig(GRPOConfig):
    advantage: Literal["grpo", "rloo"] = option("rloo", "advantage estimator")


def make_experience(model, rows, *, tokenizer, reward, reference, gather, config: GRPOConfig) -> Experience:
    """k completions per prompt (group-major), their scores and group-relative advantages.

    ``gather`` collects a tensor from every process (``Accelerator.gather``): the batch std of
    ``--scale-rewards batch`` is over the whole rollout."""
    k = config.num_generations
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    group_prompts = [p for p in rows["prompt_ids"] for _ in range(k)]  # group-major: the sampler prefills each once
    samples = SAMPLERS[config.sampler](model, group_prompts, tokenizer, config)
    rollout = samples.rollout
    if on_policy(config) and samples.log_probs is not None:
        old_logps = samples.log_probs  # metrics only (the loss detaches the new ones): no forward for them
    elif shares_prompts(config):
        old_logps = group_log_probs(model, rollout, k, config.temperature, config.batch_size)
    else:
        old_logps = batched_log_probs(model, rollout, config.temperature, config.batch_size)
    ref_logps = reference_log_probs(reference, rollout, config, group_size=k)  # each prompt run once
    completions = decode(rollout, tokenizer)
    scores = score(reward, prompts, completions, rollout, config)
    mask = rollout.response_mask
    overlong = {}
    if config.overlong_buffer:
        penalty = grpo_losses.overlong_penalty(mask.sum(-1), config.max_new_tokens, config.overlong_buffer,
                                               config.overlong_penalty)  # fmt: skip
        scores = scores + penalty
        overlong = {"objective/overlong_penalty": penalty.mean().item()}
    advantages = ADVANTAGES[config.advantage](scores, k, gather(scores), config)  # (N,)
    kl_total = (rl.kl_k1(old_logps, ref_logps) * mask).sum(-1)
    spread = scores.view(-1, k).std(-1).mean().item()
    metrics = completion_metrics(rollout, scores) | overlong
    metrics |= {"objective/kl": kl_total.mean().item(), "objective/score_std": spread}
    n = len(scores)
    tensors = {"sequences": rollout.sequences, "attention": rollout.attention, "response_mask": mask,
               "ended": rollout.ended, "prompt_length": torch.full((n,), rollout.prompt_length),
               "old_logprobs": old_logps, "ref_logprobs": ref_logps,
               "advantages": advantages[:, None].expand_as(old_logps).contiguous(),
               "n_targets": grpo_losses.LOSS_TYPES[config.loss_type].weight(mask),  # the loss type's c_i
               "n_tokens": rollout.attention.sum(-1)}  # fmt: skip
    samples = sample_rows(prompts, completions, scores, config.samples_per_log)
    return Experience(tensors, metrics, samples, prompts, completions, scores, k if shares_prompts(config) else 1)


def on_policy(config: GRPOConfig) -> bool:
    """One optimizer step per rollout (μ = 1 and one mini-batch): the policy that sampled is the one being
    updated, so the old log-probs are the new ones detached (ratio exactly 1, as in TRL's GRPOTrainer with
    ``num_iterations`` 1), and the rollout spends no forward pass on them."""
    return updates_per_iteration(config, config.rollout_prompts * config.num_generations) == 1


def shares_prompts(config: GRPOConfig) -> bool:
    """Micro-batches hold whole groups (``--batch-size`` a multiple of ``--num-generations``): the policy's
    forward then packs each group's prompt once with its k responses (``group_response_logits``)."""
    return config.batch_size % config.num_generations == 0


def loss_mask(rollout: Rollout, config: GRPOConfig) -> torch.Tensor:
    """The response tokens that enter the loss: all of them, or with ``--mask-truncated-completions``
    only those of completions that emitted EOS (TRL's ``mask_truncated_completions``). (B, T)"""
    kept = rollout.ended | (not config.mask_truncated_completions)  # (B,)
    return rollout.response_mask * kept[:, None]


def group_loss(model, batch: Batch, *, config: GRPOConfig) -> LossOutput:
    """Clipped policy loss + β·KL_k3(π‖π_ref) per token, averaged by ``--loss-type``.

    Returns L_b·C_b (see ``posttrain.ops.grpo_losses``): the loop divides the step's sum by
    Σ C_b, the sum of ``n_targets``. Metrics are the micro-batch's token means over the tokens
    in the loss, weighted the same way (for ``dapo``: token means over the step)."""
    rollout = Rollout.from_batch(batch)
    mask = loss_mask(rollout, config)
    k = config.num_generations
    logits = group_response_logits(model, rollout, k) if shares_prompts(config) else response_logits(model, rollout)
    logps = response_log_probs(logits, rollout, config.temperature)
    old_logps = logps.detach() if on_policy(config) else batch["old_logprobs"]
    log_ratio = grpo_losses.IMPORTANCE_LEVELS[config.importance_sampling_level](logps, old_logps, mask)
    pg, clipped = grpo_losses.clip_higher_token_loss(log_ratio, batch["advantages"], mask, config.cliprange,
                                                     config.epsilon_high)  # fmt: skip
    kl = rl.kl_k3(logps, batch["ref_logprobs"])
    loss_type = grpo_losses.LOSS_TYPES[config.loss_type]
    mean = functools.partial(loss_type.mean, mask=mask, response_mask=rollout.response_mask,
                             max_completion_length=config.max_new_tokens)  # fmt: skip
    weight = batch["n_targets"]  # C_b
    with torch.no_grad():
        token_log_ratio = grpo_losses.token_log_ratio(logps, old_logps, mask)
        metrics = {"policy/approxkl": 0.5 * grpo_losses.token_mean(token_log_ratio**2, mask),
                   "policy/clipfrac": grpo_losses.token_mean(clipped.float(), mask),
                   "policy/kl_k3": grpo_losses.token_mean(kl, mask)}  # fmt: skip
    return LossOutput((mean(pg) + config.kl_coef * mean(kl)) * weight, {k: v * weight for k, v in metrics.items()})


def run_grpo(config: GRPOConfig) -> Path:
    """Train per ``config`` (GRPO or RLOO by ``config.advantage``); returns the output directory."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        s = set_up(config, accelerator)
        experience = functools.partial(make_experience, tokenizer=s.tokenizer, reward=s.reward,
                                       reference=s.reference, gather=accelerator.gather, config=config)  # fmt: skip
        monitor = RLMonitor(config, s, out.work, policy_of=lambda model: model)
        policy = run_rl(s.policy, s.prompts, experience, functools.partial(group_loss, config=config), config,
                        accelerator, out.work, {}, monitor)  # fmt: skip
        common.save_final(policy, s.tokenizer, out.work, accelerator)
        out.commit(accelerator)
    return out.final
