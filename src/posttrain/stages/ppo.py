"""RLHF with PPO (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019), reading top to bottom.

Per iteration: sample completions for a batch of prompts (temperature, top-p, KV cache);
score them with the reward (minus a penalty when no EOS was emitted, clipped); compute the
policy's, the frozen reference's and the value model's per-token outputs; build per-token
rewards: −β·KL_k1 on every token plus the score on the last one (or keep the KL out of the
reward and put β·k3 in the loss); GAE(γ, λ) advantages, whitened; then ``ppo_epochs`` passes of
clipped policy loss + vf_coef × clipped value loss over shuffled mini-batches. β is fixed or
follows the adaptive controller. The implementation details and their sources are listed in
docs/ppo.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from posttrain.config import option, require
from posttrain.errors import UserError
from posttrain.models import reward_model as rm
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
from posttrain.training.rollout import Rollout, response_log_probs, response_window
from posttrain.training.sampler import SAMPLERS


@dataclass
class PPOConfig(RLConfig):
    vf_coef: float = option(0.1, "weight of the value loss")
    cliprange_value: float = option(0.2, "value clipping ε")
    gamma: float = option(1.0, "GAE discount γ")
    lam: float = option(0.95, "GAE λ")
    whiten_advantages: bool = option(True, "whiten advantages over each rollout")
    kl_estimator: Literal["k1", "k3"] = option("k1", "k1: −β·KL in the per-token reward; k3: β·KL_k3 in the loss")
    kl_target: float = option(0.0, "target KL of the adaptive controller (nats per completion); 0: fixed --kl-coef")
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in samples", needs="kl_target")
    value_model: Literal["policy", "reward"] = option(
        "policy", "value head on the policy, or a value model initialised from the reward model"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("vf_coef", "kl_target"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        require(self, "cliprange_value", self.cliprange_value > 0, "positive")
        require(self, "kl_horizon", self.kl_horizon >= 1, "at least 1")
        for name in ("gamma", "lam"):
            require(self, name, 0.0 <= getattr(self, name) <= 1.0, "in [0, 1]")
        if self.num_generations != 1:
            raise UserError("ppo samples one completion per prompt; --num-generations is for grpo and rloo")


class PolicyWithValue(torch.nn.Module):
    """The policy and its value function; the value backbone is the policy's own (shared) or a separate one."""

    def __init__(self, policy, value_head: torch.nn.Module, value_backbone: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.policy, self.value_head, self.value_backbone = policy, value_head, value_backbone

    def forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits predicting each response token and the value at that state. ((N, R, V), (N, R))"""
        inputs = {"input_ids": rollout.sequences, "attention_mask": rollout.attention,
                  "position_ids": rollout.positions()}  # fmt: skip
        shared = self.value_backbone is None
        out = self.policy(**inputs, use_cache=False, output_hidden_states=shared,
                          logits_to_keep=response_window(rollout))  # fmt: skip
        hidden = out.hidden_states[-1] if shared else self.value_backbone(**inputs).last_hidden_state
        span = slice(rollout.prompt_length - 1, -1)  # state before each response token
        return out.logits[:, :-1], self.value_head(hidden[:, span]).squeeze(-1)


def build_value(policy, config: PPOConfig, tokenizer) -> PolicyWithValue:
    """A zero-initialised head on the policy, or the reward model's backbone and head (InstructGPT)."""
    if config.value_model == "policy":
        head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return PolicyWithValue(policy, head)
    if not Path(config.reward).is_dir() or (Path(config.reward) / "ensemble.json").is_file():
        raise UserError("--value-model reward needs --reward to be one reward-model directory")
    model, rm_tokenizer, _ = rm.load_reward_model(config.reward)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            "--value-model reward needs a reward model with the policy's tokenizer; use --value-model policy"
        )
    return PolicyWithValue(policy, model.score, model.base_model.train())


@torch.no_grad()
def evaluate_rollout(model: PolicyWithValue, rollout: Rollout, config: PPOConfig):
    """Old log-probs and values of the sampled responses ((N, R) each), in micro-batches, and the
    summed entropy of the sampling distribution over all response tokens."""
    logps, values, entropy = [], [], 0.0
    for start in range(0, len(rollout.sequences), config.batch_size):
        part = rollout.select(torch.arange(start, min(start + config.batch_size, len(rollout.sequences))))
        logits, value = model(part)
        logps.append(response_log_probs(logits, part, config.temperature))
        values.append(value)
        mask = part.response_mask
        entropy += rl.entropy_from_logits(logits / config.temperature, mask).item() * mask.sum().item()
    return torch.cat(logps), torch.cat(values), entropy


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, in_reward: bool):
    """−β·KL per token (k1 estimator) plus the score at each response's last token. (N, R)"""
    rewards = -beta * kl if in_reward else torch.zeros_like(kl)
    last = mask.sum(-1) - 1  # (N,)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype)) * mask


def make_experience(model, rows, *, tokenizer, reward, reference, controller, config: PPOConfig) -> Experience:
    """Sample, score and evaluate one rollout; advantages by GAE; update the KL coefficient."""
    rollout = SAMPLERS[config.sampler](model.policy, rows["prompt_ids"], tokenizer, config).rollout
    old_logps, values, entropy = evaluate_rollout(model, rollout, config)
    ref_logps = reference_log_probs(reference, rollout, config)
    completions = decode(rollout, tokenizer)
    scores = score(reward, rows["prompt"], completions, rollout, config)
    mask = rollout.response_mask
    kl = rl.kl_k1(old_logps, ref_logps) * mask  # (N, R)
    beta = controller.value
    rewards = token_rewards(scores, kl, mask, beta, in_reward=config.kl_estimator == "k1")
    advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    kl_total = kl.sum(-1)  # (N,): KL of each completion, in nats
    # the controller sees the KL and the number of samples of all processes, so β stays the same on each
    controller.update(reduce(kl_total.mean(), "mean").item(), len(scores) * PartialState().num_processes)
    metrics = completion_metrics(rollout, scores) | {
        "objective/kl": kl_total.mean().item(),
        "objective/entropy": entropy / len(scores),  # per completion, summed over its tokens
        "objective/rlhf_reward": (scores - beta * kl_total).mean().item(),
        "objective/kl_coef": beta,
        "val/mean": rl.masked_mean(values, mask).item(),
        "val/explained_variance": rl.explained_variance(values, returns, mask).item(),
    }
    n = len(scores)
    tensors = {"sequences": rollout.sequences, "attention": rollout.attention, "response_mask": mask,
               "ended": rollout.ended, "prompt_length": torch.full((n,), rollout.prompt_length),
               "old_logprobs": old_logps, "ref_logprobs": ref_logps, "old_values": values,
               "advantages": advantages, "returns": returns, "n_targets": mask.sum(-1),
               "kl_coef": torch.full((n,), beta),  # the β this rollout was made with, for the k3 loss too
               "n_tokens": rollout.attention.sum(-1)}  # fmt: skip
    samples = sample_rows(rows["prompt"], completions, scores, config.samples_per_log)
    return Experience(tensors, metrics, samples, rows["prompt"], completions, scores)


def ppo_loss(model, batch: Batch, *, config: PPOConfig) -> LossOutput:
    """Clipped policy + vf_coef × clipped value loss (+ β·k3 when the KL is in the loss), summed over tokens."""
    rollout = Rollout.from_batch(batch)
    mask = rollout.response_mask
    logits, values = model(rollout)
    logps = response_log_probs(logits, rollout, config.temperature)
    pg, clipfrac, approxkl = rl.clipped_policy_loss(logps, batch["old_logprobs"], batch["advantages"], mask,
                                                    config.cliprange)  # fmt: skip
    vf, vf_clipfrac = rl.clipped_value_loss(values, batch["old_values"], batch["returns"], mask, config.cliprange_value)
    loss = pg + config.vf_coef * vf
    if config.kl_estimator == "k3":
        loss = loss + batch["kl_coef"][0] * rl.masked_mean(rl.kl_k3(logps, batch["ref_logprobs"]), mask)
    n = mask.sum()  # masked means x token count = token sums: the loop normalises over the global batch
    metrics = {"policy/approxkl": approxkl, "policy/clipfrac": clipfrac, "val/clipfrac": vf_clipfrac,
               "loss/policy": pg.detach(), "loss/value": vf.detach()}  # fmt: skip
    return LossOutput(loss * n, {k: v * n for k, v in metrics.items()})


def run_ppo(config: PPOConfig) -> Path:
    """Train per ``config``; returns the output directory (the policy as a Hugging Face checkpoint)."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        s = set_up(config, accelerator)
        model = build_value(s.policy, config, s.tokenizer)
        controller = (rl.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target
                      else rl.FixedKLController(config.kl_coef))  # fmt: skip
        experience = functools.partial(make_experience, tokenizer=s.tokenizer, reward=s.reward,
                                       reference=s.reference, controller=controller, config=config)  # fmt: skip
        loss = functools.partial(ppo_loss, config=config)
        monitor = RLMonitor(config, s, out.work, policy_of=lambda model: model.policy)
        model = run_rl(model, s.prompts, experience, loss, config, accelerator, out.work,
                       {"kl_controller": controller}, monitor)  # fmt: skip
        common.save_final(model.policy, s.tokenizer, out.work, accelerator)
        out.commit(accelerator)
    return out.final
