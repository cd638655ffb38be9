"""The RL iteration shared by PPO, GRPO and RLOO, built from the shared loop's pieces.

Each iteration (one "step" for logging, checkpoints and ``--max-steps``):
  1. takes this process's prompts of the iteration's global batch: the supervised loop's
     ``make_plan`` and ``EpochOrder`` (seeded, ``--group-by-length``), so resume replays the same prompts;
  2. has the stage make experience: sample responses, score them, compute what its loss
     needs (old log-probs, reference log-probs, advantages, ...), all without gradient;
  3. runs ``ppo_epochs`` passes over the experience in shuffled mini-batches of
     ``batch_size x grad_accum`` samples per process, each one ``optimizer_step`` of the
     shared loop (token-level normalisation over the mini-batch on all processes);
  4. logs the iteration's metrics and writes resumable checkpoints with the supervised loop's
     helpers (``log_due``, ``save_due``, ``save_state``, ``resume_state``), with the stage's
     extra state (e.g. the adaptive KL coefficient).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator

from posttrain.data.sampler import micro_batch
from posttrain.errors import UserError
from posttrain.training.faults import maybe_die
from posttrain.training.loop import (
    Batch,
    EpochOrder,
    Plan,
    add_sums,
    log_due,
    make_plan,
    optimizer_step,
    resume_state,
    save_due,
    save_state,
    start_output,
    to_device,
    window_record,
)
from posttrain.training.metrics import MetricsLog, progress_bar
from posttrain.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class Experience:
    """Per-sample tensors (first dimension N) that the loss reads, and the rollout's metrics."""

    tensors: dict[str, torch.Tensor]  # must hold "n_targets" (N,) and "n_tokens" (N,) per sample
    metrics: dict[str, float]
    samples: list[dict[str, Any]]  # a few (prompt, completion, score) rows for OUTPUT/samples.jsonl
    prompts: list[Any]  # the N prompts (each repeated per completion), as in the data
    completions: list[str]  # the N completions, decoded as the reward read them
    scores: torch.Tensor  # (N,) the proxy reward's score of each completion (after penalty and clipping)
    group_size: int = 1  # rows come in groups of this many that every micro-batch keeps whole


MakeExperience = Callable[[torch.nn.Module, dict[str, list]], Experience]


def updates_per_iteration(config, samples: int) -> int:
    per_update = config.batch_size * config.grad_accum
    if samples % per_update:
        raise UserError(
            f"each rollout has {samples} samples per process (--rollout-prompts x --num-generations), "
            f"not a multiple of --batch-size x --grad-accum = {per_update}"
        )
    return config.ppo_epochs * samples // per_update


def mini_batches(experience: Experience, config, seed: int) -> list[list[Batch]]:
    """Shuffled optimizer steps over the experience: each a list of ``grad_accum`` micro-batches.
    Whole groups of ``experience.group_size`` rows are shuffled, so that a micro-batch of a multiple
    of that size holds whole groups, in order."""
    n, k = len(experience.tensors["n_targets"]), experience.group_size
    per_update, steps = config.batch_size * config.grad_accum, []
    for epoch in range(config.ppo_epochs):
        groups = torch.randperm(n // k, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        order = (groups[:, None] * k + torch.arange(k)).flatten()  # (N,); k = 1: a permutation of the rows
        for start in range(0, n, per_update):
            chunk = order[start : start + per_update]
            micro = [chunk[i : i + config.batch_size] for i in range(0, per_update, config.batch_size)]
            steps.append([{k: v[m] for k, v in experience.tensors.items()} | _sums(experience, m) for m in micro])
    return steps


def _sums(experience: Experience, index: torch.Tensor) -> Batch:
    return {
        "n_targets": experience.tensors["n_targets"][index].sum(),
        "n_tokens": experience.tensors["n_tokens"][index].sum(),
    }


def mean_over_processes(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], dtype=torch.float64), reduction="mean")
    return dict(zip(names, values.tolist(), strict=True))


def write_samples(path: Path, step: int, samples: list[dict[str, Any]], accelerator: Accelerator) -> None:
    """Append the main process's sample completions of this iteration (one JSON object per completion)."""
    if accelerator.is_main_process:
        with path.open("a") as file:
            file.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: new and old log-probs of an untouched policy must agree (ratio 1), as in TRL's RL trainers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_rl(model, prompts: datasets.Dataset, make_experience: MakeExperience, loss_fn, config, accelerator: Accelerator,
           output: Path, extra_state: dict[str, Any], monitor) -> torch.nn.Module:  # fmt: skip
    """Run the RL iterations described in the module docstring; returns the unwrapped model.

    ``monitor`` (``posttrain.stages.rl_monitor.RLMonitor``) watches each rollout before the update
    and samples held-out prompts; it may end the run early (``--stop-on-overoptimisation``)."""
    plan = make_plan(len(prompts), config, accelerator.num_processes, config.rollout_prompts)
    disable_dropout(model)
    updates = updates_per_iteration(config, config.rollout_prompts * config.num_generations)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, plan.total_steps * updates)
    holders = extra_state | {"monitor": monitor}
    start = 0
    if config.resume:
        start = resume_state(output, model, optimizer, scheduler, plan, accelerator, holders)["step"]
    start_output(config, accelerator, output, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    log = MetricsLog(output / "metrics.jsonl", accelerator)
    if start == 0 and monitor.eval_due(0, last=False):
        log.write({"step": 0} | monitor.evaluate(accelerator.unwrap_model(model)))
    with progress_bar(plan.total_steps, start, "rl", accelerator.is_main_process) as bar:
        order = EpochOrder(prompts, plan, config)
        for step in range(start + 1, plan.total_steps + 1):
            mine = micro_batch(order.global_batch(step), 0, accelerator.process_index, accelerator.num_processes,
                               config.rollout_prompts)  # fmt: skip
            tick, last = time.perf_counter(), step == plan.total_steps
            model.eval()
            experience = make_experience(accelerator.unwrap_model(model), prompts[mine])
            rollout_seconds = time.perf_counter() - tick
            watched = monitor.observe(step, experience, accelerator.unwrap_model(model), last)
            model.train()
            tick = time.perf_counter()
            window = update(model, optimizer, scheduler, experience, loss_fn, accelerator, config, output, step)
            update_seconds = time.perf_counter() - tick
            maybe_die(f"step/{step}")
            record = iteration_record(step, plan, experience, window, (rollout_seconds, update_seconds), accelerator,
                                      config)  # fmt: skip
            record |= watched
            if monitor.eval_due(step, last or monitor.stop):
                record |= monitor.evaluate(accelerator.unwrap_model(model))
            bar.update(1)
            if log_due(step, plan, config) or monitor.stop:
                log.write(record)
            if step % config.sample_steps == 0 or last or monitor.stop:
                write_samples(output / "samples.jsonl", step, experience.samples, accelerator)
                bar.set_postfix(score=f"{record['objective/scores']:.3f}", kl=f"{record['objective/kl']:.3f}")
            if monitor.stop:
                logger.info("--stop-on-overoptimisation: stopping after iteration %d", step)
                break
            if save_due(step, plan, config):
                save_state(output, step, plan, model, optimizer, scheduler, accelerator, config, holders)
    monitor.finish()
    return accelerator.unwrap_model(model)


def update(model, optimizer, scheduler, experience: Experience, loss_fn, accelerator: Accelerator, config,
           output: Path, step: int) -> dict[str, float]:  # fmt: skip
    """``ppo_epochs`` passes over the experience, one optimizer step per mini-batch; the summed metrics
    of all of them, and the last step's gradient norm and learning rate."""
    window: dict[str, float] = {}
    for micro in mini_batches(experience, config, config.seed * 100_003 + step):
        micro = [to_device(b, accelerator.device) for b in micro]
        sums, grad_norm, learning_rate = optimizer_step(model, optimizer, scheduler, micro, loss_fn, accelerator,
                                                        config, output / "checkpoints")  # fmt: skip
        add_sums(window, sums)
    return window | {"grad_norm": grad_norm, "learning_rate": learning_rate}


def iteration_record(step: int, plan: Plan, experience: Experience, window: dict[str, float],
                     seconds: tuple[float, float], accelerator: Accelerator, config) -> dict[str, float]:  # fmt: skip
    """The iteration's metrics: the rollout's (mean over processes), the updates' and the throughput
    (``seconds``: of the rollout, and of the updates)."""
    grad_norm, learning_rate = window.pop("grad_norm"), window.pop("learning_rate")
    rollout_seconds, update_seconds = seconds
    record = {"step": step, "episode": step * plan.global_batch * config.num_generations}
    record |= mean_over_processes(experience.metrics, accelerator) | window_record(window)
    record |= {"learning_rate": learning_rate, "grad_norm": grad_norm}
    samples = len(experience.tensors["n_targets"]) * accelerator.num_processes
    record["rollout_tokens_per_second"] = experience.metrics["completions/mean_length"] * samples / rollout_seconds
    record["samples_per_second"] = config.ppo_epochs * samples / update_seconds
    return record
