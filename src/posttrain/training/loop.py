"""The one training loop, shared by every stage.

A stage hands over a model, its tokenized data with a collate function, and a loss
function that returns the loss *summed* over the micro-batch's targets (tokens for SFT,
pairs for DPO). Per optimizer step the loop:
  1. takes this process's micro-batches of the step's global batch (``data.sampler``);
  2. counts the targets of the whole global batch, over all accumulation steps and all
     processes, and scales each micro-batch's summed loss by ``world_size / n_targets``
     (DDP averages gradients over processes), so the gradient is that of the mean loss per
     target over the global batch however it is split: accumulation and data parallelism
     are exact, unlike averaging per-micro-batch means;
  3. clips the gradient norm, steps AdamW and the schedule;
  4. logs, evaluates and writes resumable checkpoints every N steps.
Built on ``accelerate``: one process, DDP (``accelerate launch``), FSDP or DeepSpeed configs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from posttrain.config import TrainConfig
from posttrain.data.sampler import epoch_batches, micro_batch
from posttrain.errors import UserError
from posttrain.training import checkpoint as ckpt
from posttrain.training.faults import maybe_die
from posttrain.training.metrics import MetricsLog, progress_bar, truncate_after
from posttrain.training.optim import build_optimizer, build_scheduler
from posttrain.training.output import open_output

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """A micro-batch's loss summed over its targets, and metrics summed the same way."""

    loss_sum: torch.Tensor  # 0-dim, differentiable
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as sum / n_targets


LossFn = Callable[[torch.nn.Module, Batch], LossOutput]


@dataclass
class Batches:
    """Tokenized examples (a ``length`` column is required) and the function that batches rows."""

    dataset: datasets.Dataset
    collate: Callable[[dict[str, list]], Batch]  # must set "n_targets" and "n_tokens"


@dataclass(frozen=True)
class Plan:
    global_batch: int  # examples per optimizer step, over all processes and accumulation steps
    steps_per_epoch: int
    total_steps: int


def make_plan(num_examples: int, config: TrainConfig, world_size: int, rollout_prompts: int = 0) -> Plan:
    """The run's steps. A supervised step takes ``batch_size x grad_accum`` examples on each process;
    an RL iteration (``rollout_prompts`` > 0) takes ``rollout_prompts`` prompts on each process."""
    global_batch = (rollout_prompts or config.batch_size * config.grad_accum) * world_size
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0 and rollout_prompts:
        raise UserError(f"the prompts file has {num_examples} prompts, fewer than one rollout of {global_batch}")
    if steps_per_epoch == 0:
        raise UserError(
            f"the training data has {num_examples} examples, fewer than one global batch of {global_batch} "
            f"(--batch-size {config.batch_size} x --grad-accum {config.grad_accum} x {world_size} processes)"
        )
    total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.epochs
    return Plan(global_batch, steps_per_epoch, total)


def add_sums(sums: dict[str, float], values: dict[str, float]) -> None:
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + value


def reduce_sums(local: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
    """Sum each named 0-dim tensor over all processes (one collective)."""
    names = sorted(local)
    stacked = torch.stack([torch.as_tensor(local[n], dtype=torch.float64) for n in names])
    return dict(zip(names, accelerator.reduce(stacked, reduction="sum").tolist(), strict=True))


class EpochOrder:
    """Global batches of the current epoch (``--seed``/``--data-seed``, ``--group-by-length``),
    recomputed only when the epoch changes: examples for the supervised loop, prompts for RL."""

    def __init__(self, data: Batches | datasets.Dataset, plan: Plan, config: TrainConfig) -> None:
        dataset = data.dataset if isinstance(data, Batches) else data
        self.lengths = list(dataset["length"])  # one int per example, read once
        self.plan, self.config = plan, config
        self.epoch, self.batches = -1, []

    def global_batch(self, step: int) -> list[int]:
        """Example indices of (1-based) optimizer step ``step``."""
        epoch, index = divmod(step - 1, self.plan.steps_per_epoch)
        if epoch != self.epoch:
            c = self.config
            seed = c.seed if c.data_seed < 0 else c.data_seed
            self.batches = epoch_batches(self.lengths, self.plan.global_batch, seed, epoch, c.group_by_length)
            self.epoch = epoch
        return self.batches[index]


def step_micro_batches(data: Batches, batch: list[int], config: TrainConfig, accelerator: Accelerator) -> list[Batch]:
    """This process's collated micro-batches of one global batch."""
    rank, world = accelerator.process_index, accelerator.num_processes
    slices = [micro_batch(batch, a, rank, world, config.batch_size) for a in range(config.grad_accum)]
    return [to_device(data.collate(data.dataset[s]), accelerator.device) for s in slices]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def accumulate(model, micro_batches: list[Batch], loss_fn: LossFn, accelerator: Accelerator) -> dict[str, float]:
    """Forward and backward every micro-batch with global-target normalisation.

    Returns the step's sums over the global batch: ``loss``, ``n_targets``, ``n_tokens``
    and the loss function's metrics.
    """
    n_local = sum(b["n_targets"] for b in micro_batches)
    n_global = reduce_sums({"n": n_local}, accelerator)["n"]
    if n_global == 0:
        raise UserError("a global batch has no target tokens; check the completion masks of the data")
    scale = accelerator.num_processes / n_global
    local: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            out = loss_fn(model, batch)
            accelerator.backward(out.loss_sum * scale)
        values = {"loss": out.loss_sum, "n_targets": batch["n_targets"], "n_tokens": batch["n_tokens"]}
        for name, value in {**values, **out.metric_sums}.items():
            local[name] = local.get(name, 0) + value.detach().double()
    return reduce_sums(local, accelerator)


def window_record(sums: dict[str, float]) -> dict[str, float]:
    """Per-target means of a window's (or an evaluation's) global sums."""
    n = sums["n_targets"]
    means = {name: value / n for name, value in sums.items() if name not in ("n_targets", "n_tokens")}
    return {"loss": means.pop("loss"), **means}


@torch.no_grad()
def evaluate(model, data: Batches, loss_fn: LossFn, accelerator: Accelerator, batch_size: int) -> dict[str, float]:
    """Loss and metrics on held-out data, per target over the whole set, prefixed ``eval/``."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    indices = list(range(len(data.dataset)))
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    local: dict[str, torch.Tensor] = {"loss": torch.tensor(0.0), "n_targets": torch.tensor(0.0)}
    for chunk in chunks[accelerator.process_index :: accelerator.num_processes]:
        batch = to_device(data.collate(data.dataset[chunk]), accelerator.device)
        out = loss_fn(unwrapped, batch)
        for name, value in {"loss": out.loss_sum, "n_targets": batch["n_targets"], **out.metric_sums}.items():
            local[name] = local.get(name, 0) + value.double()
    unwrapped.train()
    return {f"eval/{k}": v for k, v in window_record(reduce_sums(local, accelerator)).items()}


def resume_state(output: Path, model, optimizer, scheduler, plan: Plan, accelerator: Accelerator,
                 holders: dict | None = None) -> dict:  # fmt: skip
    """Load the newest readable complete checkpoint; refuse one written for other data or batch sizes.

    ``holders`` (name -> object with ``load_state_dict``, e.g. the RL stages' KL controller) get their
    saved state back. Returns the trainer state, or ``{"step": 0}`` (and says so) when OUTPUT has none
    yet: a run killed before its first checkpoint restarts from the beginning in the same OUTPUT.
    """
    directory = output / "checkpoints"
    state = ckpt.load_newest_readable(directory, model, optimizer, scheduler, accelerator.process_index)
    if state is None:
        logger.info("--resume: no complete checkpoint in %s yet; starting from the beginning", directory)
        return {"step": 0}
    written = {k: state[k] for k in ("global_batch", "steps_per_epoch", "total_steps")}
    if written != plan.__dict__:
        raise UserError(f"--resume: {directory} step {state['step']} was written for {written}, "
                        f"this run has {plan.__dict__}")  # fmt: skip
    for name, holder in (holders or {}).items():
        holder.load_state_dict(state["extra"][name])
    logger.info("--resume: continuing from step %d", state["step"])
    return state


def save_due(step: int, plan: Plan, config: TrainConfig) -> bool:
    """A resumable checkpoint every ``--save-steps`` steps; none at the last (the final model follows)."""
    return bool(config.save_steps) and step % config.save_steps == 0 and step < plan.total_steps


def save_state(output: Path, step: int, plan: Plan, model, optimizer, scheduler, accelerator: Accelerator,
               config: TrainConfig, holders: dict | None = None) -> None:  # fmt: skip
    """Write the checkpoint of ``step``: weights, optimizer, schedule, RNG, the plan it belongs to
    (``resume_state`` checks it) and the state of each of ``holders``."""
    state = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, **plan.__dict__}
    if holders:
        state["extra"] = {name: holder.state_dict() for name, holder in holders.items()}
    ckpt.save_checkpoint(output / "checkpoints", model, optimizer, scheduler, accelerator, state,
                         config.save_total_limit)  # fmt: skip


def log_due(step: int, plan: Plan, config: TrainConfig) -> bool:
    """Metrics every ``--logging-steps`` steps and at the last."""
    return step % config.logging_steps == 0 or step == plan.total_steps


def start_output(config, accelerator: Accelerator, output: Path, start: int) -> None:
    """Open OUTPUT once every check passed; on resume, forget records and debris past the starting step."""
    open_output(config, accelerator, output)
    if accelerator.is_main_process and config.resume:
        truncate_after(output / "metrics.jsonl", start)
        truncate_after(output / "samples.jsonl", start)  # RL stages
        ckpt.remove_debris(output / "checkpoints")


def optimizer_step(model, optimizer, scheduler, micro_batches, loss_fn, accelerator, config, checkpoints: Path):
    """One optimizer step over ``micro_batches``: accumulate, check, clip, step.

    Returns (global sums of the step, gradient norm before clipping, learning rate used).
    A NaN or infinite loss or gradient norm stops the run before the update (a non-finite
    gradient with a finite loss happens: an overflow in backward), naming the last good checkpoint.
    """
    sums = accumulate(model, micro_batches, loss_fn, accelerator)
    loss = sums["loss"] / sums["n_targets"]
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf))
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            last = ckpt.latest_checkpoint(checkpoints)
            raise UserError(f"the {name} is {value}; stopped before the update. "
                            f"Last good checkpoint: {last or 'none'}")  # fmt: skip
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, learning_rate


def throughput(window: dict[str, float], steps: int, samples_per_step: int, seconds: float) -> dict[str, float]:
    return {"tokens_per_second": window["n_tokens"] / seconds, "samples_per_second": steps * samples_per_step / seconds}


def train(
    model: torch.nn.Module,
    train_data: Batches,
    eval_data: Batches | None,
    loss_fn: LossFn,
    config: TrainConfig,
    accelerator: Accelerator,
    output: Path,
) -> torch.nn.Module:
    """Run the optimisation described in the module docstring; returns the unwrapped model.

    ``output`` is created (with the resolved config) only once the plan and any checkpoint to
    resume from have been checked."""
    plan = make_plan(len(train_data.dataset), config, accelerator.num_processes)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, plan.total_steps)
    start = resume_state(output, model, optimizer, scheduler, plan, accelerator)["step"] if config.resume else 0
    start_output(config, accelerator, output, start)
    model, optimizer = accelerator.prepare(model, optimizer)  # not the scheduler: we step it once per step
    model.train()
    log = MetricsLog(output / "metrics.jsonl", accelerator)
    with progress_bar(plan.total_steps, start, "training", accelerator.is_main_process) as bar:
        order, window, window_steps, tick = EpochOrder(train_data, plan, config), {}, 0, time.perf_counter()
        for step in range(start + 1, plan.total_steps + 1):
            micro_batches = step_micro_batches(train_data, order.global_batch(step), config, accelerator)
            sums, grad_norm, learning_rate = optimizer_step(
                model, optimizer, scheduler, micro_batches, loss_fn, accelerator, config, output / "checkpoints"
            )
            maybe_die(f"step/{step}")
            add_sums(window, sums)
            window_steps += 1
            bar.update(1)
            if log_due(step, plan, config):
                now = time.perf_counter()
                record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), **window_record(window)}
                record |= {"learning_rate": learning_rate, "grad_norm": grad_norm}
                record |= throughput(window, window_steps, plan.global_batch, now - tick)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                window, window_steps, tick = {}, 0, now
            if eval_data is not None and config.eval_steps and step % config.eval_steps == 0:
                log.write({"step": step, **evaluate(model, eval_data, loss_fn, accelerator, config.batch_size)})
            if save_due(step, plan, config):
                save_state(output, step, plan, model, optimizer, scheduler, accelerator, config)
    if eval_data is not None and not (config.eval_steps and plan.total_steps % config.eval_steps == 0):
        log.write({"step": plan.total_steps, **evaluate(model, eval_data, loss_fn, accelerator, config.batch_size)})
    return accelerator.unwrap_model(model)
