"""Reward modelling: a scalar reward r(x, y) fitted to pairwise preferences (Bradley–Terry).

In order: load the tokenizer and the preference rows, validate and tokenize them, group the
pairs by prompt (one example per prompt: its distinct responses and every ranked pair between
them, as InstructGPT batches K ranked responses), load the causal LM as a sequence classifier
with a new scalar ``score`` head (optionally with LoRA), train with the shared loop, then
measure accuracy and calibration on the held-out pairs, score every training response for the
reward statistics RL normalises with, and save a Hugging Face checkpoint. The loss is
normalised per prompt group over the whole global batch. ``--ensemble K`` repeats the
training with K seeds (Coste et al. 2023). See docs/reward-model.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.config import TrainConfig, option
from posttrain.data.collate import pad_batch
from posttrain.data.formats import detect_format, require_format, validate_rows
from posttrain.data.preference import tokenize_preferences
from posttrain.errors import UserError
from posttrain.models.loading import add_lora
from posttrain.models.reward_model import (
    ENSEMBLE_FILE,
    STATS_FILE,
    RewardScorer,
    RewardStats,
    load_reward_backbone,
)
from posttrain.stages import common
from posttrain.training.loop import Batch, Batches, LossOutput, make_plan, to_device, train
from posttrain.training.metrics import MetricsLog
from posttrain.training.output import claim_output, open_output


@dataclass
class RMConfig(TrainConfig):
    learning_rate: float = option(1e-5, "peak learning rate of AdamW")
    group_by_length: bool = option(True, "batch examples of similar length together to waste less padding")
    center_rewards_coefficient: float = option(
        0.0, "c: adds c·mean((r⁺ + r⁻)²) to the loss to keep rewards centred on 0 (Eisenstein et al. 2023)"
    )
    ensemble: int = option(1, "train K reward models, seeds seed+i, into OUTPUT/member-i (Coste et al. 2023)")
    ensemble_shuffle: bool = option(
        True,
        "ensemble members also see different data orders; --no-ensemble-shuffle keeps one (--data-seed)",
        needs="ensemble",
    )

    def validate(self) -> None:
        super().validate()
        if self.center_rewards_coefficient < 0:
            raise UserError(f"--center-rewards-coefficient must be non-negative, got {self.center_rewards_coefficient}")
        if self.ensemble < 1:
            raise UserError(f"--ensemble must be at least 1, got {self.ensemble}")


# ---- data: preference rows -> one example per prompt (distinct responses + ranked pairs) ----


def read_margins(rows: datasets.Dataset, source: str) -> list[float] | None:
    """The optional ``margin`` column (Llama 2's preference-strength margin): a finite number per row."""
    if "margin" not in rows.column_names:
        return None
    margins = list(rows["margin"])
    for row, value in enumerate(margins, start=1):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{source}: row {row}: column 'margin': expected a finite number, got {value!r}")
    return [float(m) for m in margins]


def group_by_prompt(tokenized: datasets.Dataset, margins: list[float] | None, source: str) -> datasets.Dataset:
    """One example per prompt: its distinct responses and the ranked pairs (i ≻ j) between them.

    InstructGPT (Ouyang et al. 2022, sec. 3.5) puts all C(K, 2) comparisons of one prompt in one
    batch element, so each response is scored once and prompts with many comparisons do not
    dominate. Rows are grouped by prompt token ids; groups, responses and pairs keep the order
    in which they first appear. A pair made identical by truncation is dropped.
    """
    groups: dict[tuple[int, ...], dict] = {}
    columns = [list(tokenized[c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids", "row")]
    for prompt, chosen, rejected, row in zip(*columns, strict=True):
        group = groups.setdefault(tuple(prompt), {"prompt_ids": prompt, "responses": {}, "chosen": [],
                                                  "rejected": [], "margin": [], "row": row})  # fmt: skip
        i = group["responses"].setdefault(tuple(chosen), len(group["responses"]))
        j = group["responses"].setdefault(tuple(rejected), len(group["responses"]))
        if i != j:
            group["chosen"].append(i)
            group["rejected"].append(j)
            group["margin"].append(margins[row - 1] if margins else 0.0)
    kept = [g for g in groups.values() if g["chosen"]]
    if not kept:
        raise UserError(f"{source}: no pair has two different answers after truncation to --max-length")
    for g in kept:
        g["responses"] = [list(r) for r in g["responses"]]  # insertion order = index order
        g["length"] = len(g["prompt_ids"]) + max(len(r) for r in g["responses"])  # the widest row it pads to
    names = ("prompt_ids", "responses", "chosen", "rejected", "margin", "row", "length")
    return datasets.Dataset.from_dict({name: [g[name] for g in kept] for name in names})


def collate_groups(rows: dict[str, list], pad_id: int) -> Batch:
    """B prompt groups -> their R distinct responses as one right-padded batch, pairs as row indices.

    ``input_ids``/``attention_mask`` (R, T): prompt + response; ``response_group`` (R,);
    ``chosen``/``rejected`` (P,): rows of each pair's preferred and other answer; ``margin``
    and ``pair_group`` (P,); ``n_targets`` = B: the loss is normalised per prompt group.
    """
    sequences, response_group, chosen, rejected, pair_group = [], [], [], [], []
    groups = zip(rows["prompt_ids"], rows["responses"], rows["chosen"], rows["rejected"], strict=True)
    for g, (prompt, responses, better, worse) in enumerate(groups):
        offset = len(sequences)
        sequences += [prompt + response for response in responses]
        response_group += [g] * len(responses)
        chosen += [offset + i for i in better]
        rejected += [offset + j for j in worse]
        pair_group += [g] * len(better)
    batch = pad_batch({"input_ids": sequences, "completion_mask": [[1] * len(s) for s in sequences]}, pad_id)
    del batch["labels"]  # rewards need no token labels; ``n_tokens`` (real tokens) stays for throughput
    index = functools.partial(torch.tensor, dtype=torch.long)
    margin = torch.tensor([m for group in rows["margin"] for m in group], dtype=torch.float32)
    pairs = {"chosen": index(chosen), "rejected": index(rejected), "pair_group": index(pair_group), "margin": margin}
    n_targets = torch.tensor(len(rows["prompt_ids"]))
    return {**batch, "response_group": index(response_group), **pairs, "n_targets": n_targets}


def prepare(rows: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, config: RMConfig) -> Batches:
    """Validate, tokenize and group one split of preference rows."""
    fmt = detect_format(rows, source)
    require_format(fmt, ("preference",), source, "rm", rows.column_names)
    validate_rows(rows, fmt, source)
    margins = read_margins(rows, source)
    tokenized = tokenize_preferences(rows, fmt, tokenizer, config.max_length, config.truncation, source)
    groups = group_by_prompt(tokenized, margins, source)
    return Batches(groups, functools.partial(collate_groups, pad_id=tokenizer.pad_token_id))


# ---- loss ----


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center: float) -> torch.Tensor:
    """Per-pair loss (P,): −log σ(r⁺ − r⁻ − m) + c·(r⁺ + r⁻)².

    Bradley–Terry: P(y⁺ ≻ y⁻) = σ(r⁺ − r⁻) (Bradley & Terry 1952; InstructGPT eq. 1). The margin m
    demands a larger gap for clearer preferences (Touvron et al. 2023, Llama 2, eq. 2; 0 without a
    ``margin`` column). The centering term pins the reward's free offset near 0 (Eisenstein et al.
    2023, "Helping or Herding?"; TRL's ``center_rewards_coefficient``).
    """
    losses = -F.logsigmoid(chosen - rejected - margin)
    return losses + center * (chosen + rejected) ** 2 if center else losses


def group_means(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` (N,) within each group (N,) -> (n_groups,); differentiable."""
    sums = values.new_zeros(n_groups).index_add(0, group, values)
    counts = values.new_zeros(n_groups).index_add(0, group, torch.ones_like(values))
    return sums / counts


def rm_loss(model: torch.nn.Module, batch: Batch, config: RMConfig) -> LossOutput:
    """Σ over groups of the mean pair loss of each group; metrics summed the same way (logged per group).

    ``accuracy``: pairs with r⁺ > r⁻; ``margin``: r⁺ − r⁻; ``rewards/chosen``, ``rewards/rejected``:
    over pairs; ``rewards/mean``: over the group's distinct responses.
    """
    rewards = model(batch["input_ids"], batch["attention_mask"]).float()  # (R,)
    good, bad = rewards[batch["chosen"]], rewards[batch["rejected"]]  # (P,)
    n, groups = int(batch["n_targets"]), batch["pair_group"]
    losses = group_means(pair_losses(good, bad, batch["margin"], config.center_rewards_coefficient), groups, n)
    gap, good, bad = (good - bad).detach(), good.detach(), bad.detach()

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return group_means(values, groups, n).sum()

    metrics = {"accuracy": per_group((gap > 0).float()), "margin": per_group(gap), "rewards/chosen": per_group(good),
               "rewards/rejected": per_group(bad),
               "rewards/mean": group_means(rewards.detach(), batch["response_group"], n).sum()}  # fmt: skip
    return LossOutput(losses.sum(), metrics)


# ---- evaluation: calibration on held-out pairs, reward statistics on the training responses ----


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """Binary ECE = Σ_b (n_b / N)·|acc_b − conf_b| (Naeini et al. 2015; Guo et al. 2017, eq. 3).

    ``probs``: P(label = 1), (N,); ``labels``: 0/1, (N,). Prediction ŷ = [p > 0.5], confidence
    max(p, 1 − p), ``bins`` equal-width bins (k/bins, (k+1)/bins] of confidence (the first also
    holds 0); acc_b, conf_b: mean correctness and confidence in bin b. Confidence is at least
    0.5, so only the upper half of the bins fills. Swapping a pair's order (p -> 1 − p, label
    flipped) leaves it unchanged.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if probs.numel() == 0:
        return float("nan")
    predicted = (probs > 0.5).double()
    confidence = torch.where(predicted.bool(), probs, 1 - probs)
    correct = (predicted == labels).double()
    index = (confidence * bins).ceil().long().sub(1).clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add(0, index, correct - confidence)  # n_b·(acc_b − conf_b)
    return (gap.abs().sum() / len(probs)).item()


def scored_chunks(scorer, data: Batches, accelerator: Accelerator, batch_size: int) -> Iterator[tuple[Batch, Tensor]]:
    """This process's share of ``data``, ``batch_size`` groups at a time: each batch and its rewards (R,)."""
    scorer.eval()
    indices = list(range(len(data.dataset)))
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for chunk in chunks[accelerator.process_index :: accelerator.num_processes]:
        batch = to_device(data.collate(data.dataset[chunk]), accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            rewards = scorer(batch["input_ids"], batch["attention_mask"]).float()
        yield batch, rewards


def calibration(scorer, data: Batches, accelerator: Accelerator, batch_size: int) -> dict[str, float]:
    """Held-out ``eval/accuracy`` (per group, as the loop logs it) and ``eval/ece`` of σ(r⁺ − r⁻) over pairs."""
    probs, accuracies = [], []
    for batch, rewards in scored_chunks(scorer, data, accelerator, batch_size):
        gap = rewards[batch["chosen"]] - rewards[batch["rejected"]]
        probs += torch.sigmoid(gap).tolist()
        accuracies += group_means((gap > 0).float(), batch["pair_group"], int(batch["n_targets"])).tolist()
    probs, accuracies = gather_object(probs), gather_object(accuracies)
    ece = expected_calibration_error(probs, [1] * len(probs))  # y⁺ is listed first: the label is always 1
    return {"eval/accuracy": sum(accuracies) / len(accuracies), "eval/ece": ece, "eval/pairs": len(probs)}


def reward_stats(scorer, data: Batches, accelerator: Accelerator, batch_size: int) -> RewardStats:
    """Mean and std (ddof 0) of the final rewards of every distinct (prompt, response) in ``data``."""
    rewards = []
    for _, scores in scored_chunks(scorer, data, accelerator, batch_size):
        rewards += scores.tolist()
    values = torch.tensor(gather_object(rewards), dtype=torch.float64)
    return RewardStats(values.mean().item(), values.std(unbiased=False).item(), len(values))


# ---- run ----


def load_scorer(config: RMConfig, tokenizer: PreTrainedTokenizerBase) -> RewardScorer:
    """The model to train: the causal LM's backbone and a new ``score`` head, all weights or LoRA + head."""
    model = load_reward_backbone(config.model, tokenizer.pad_token_id, config.trust_remote_code)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if config.lora_r:
        c = config
        model = add_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules, task_type="SEQ_CLS")
    return RewardScorer(model)


def train_member(config: RMConfig, tokenizer, train_data: Batches, eval_data: Batches | None, accelerator,
                 output: Path) -> None:  # fmt: skip
    """Train one reward model into ``output``; then calibration, reward statistics, checkpoint."""
    set_seed(config.seed)  # initialises the new score head
    scorer = load_scorer(config, tokenizer)
    loss = functools.partial(rm_loss, config=config)
    scorer = train(scorer, train_data, eval_data, loss, config, accelerator, output)
    step = make_plan(len(train_data.dataset), config, accelerator.num_processes).total_steps
    record = calibration(scorer, eval_data, accelerator, config.batch_size) if eval_data is not None else {}
    stats = reward_stats(scorer, train_data, accelerator, config.batch_size)
    record |= {"reward_stats/mean": stats.mean, "reward_stats/std": stats.std}
    MetricsLog(output / "metrics.jsonl", accelerator).write({"step": step, **record})
    common.save_final(scorer.model, tokenizer, output, accelerator)
    if accelerator.is_main_process:  # written last: its presence marks a finished member (ensemble --resume)
        (output / STATS_FILE).write_text(json.dumps({**dataclasses.asdict(stats), "step": step}, indent=2) + "\n")
    accelerator.free_memory()  # drop the accelerator's references before the next ensemble member


def member_config(config: RMConfig, i: int, directory: Path) -> RMConfig:
    """Member i: seed + i, data order seed + i (or the ensemble's one order), written to ``directory/member-i``.

    Under the ensemble's --resume a member continues from its checkpoint, or starts afresh without one.
    """
    order = config.seed if config.data_seed < 0 else config.data_seed
    return dataclasses.replace(config, seed=config.seed + i, data_seed=order + i if config.ensemble_shuffle else order,
                               output=str(directory / f"member-{i}"), ensemble=1)  # fmt: skip


def train_ensemble(config: RMConfig, tokenizer, train_data: Batches, eval_data: Batches | None, accelerator,
                   output: Path) -> None:  # fmt: skip
    """K members in ``output/member-i`` (finished ones skipped on --resume), then the index ``ensemble.json``."""
    open_output(config, accelerator, output, trackers=False)
    members = [member_config(config, i, output) for i in range(config.ensemble)]
    for member in members:
        if not (config.resume and (Path(member.output) / STATS_FILE).is_file()):  # skip finished members
            train_member(member, tokenizer, train_data, eval_data, accelerator, Path(member.output))
    if accelerator.is_main_process:
        index = {"members": [Path(m.output).name for m in members], "seeds": [m.seed for m in members]}
        (output / ENSEMBLE_FILE).write_text(json.dumps(index, indent=2) + "\n")


def run_rm(config: RMConfig) -> Path:
    """Train per ``config``; returns the output directory (a reward model, or an ensemble of them)."""
    accelerator = common.make_accelerator(config)
    with claim_output(config, accelerator) as out:
        set_seed(config.seed)
        tokenizer = common.load_stage_tokenizer(config)
        with accelerator.main_process_first():  # one split and tokenization, shared by every ensemble member
            train_data, eval_data = common.prepare_splits(config, tokenizer, prepare)
        make_plan(len(train_data.dataset), config, accelerator.num_processes)  # a batch too big: before loading
        run = train_member if config.ensemble == 1 else train_ensemble
        run(config, tokenizer, train_data, eval_data, accelerator, out.work)
        out.commit(accelerator)
    accelerator.end_training()
    return out.final
