"""TRL's side of ``bench/trl_compare.py``: one stage of TRL 1.16 in this process, on posttrain's work.

SFT, DPO and RM train on the very token ids posttrain's own ``prepare`` produces, in the very batches
posttrain's sampler forms (``epoch_batches`` with the same seed), fed in order; so step 1 sees the
same batch in both frameworks and the first-step losses must agree. GRPO gets the same prompts
and rule reward. Writes ``result.json`` in the output directory: the seconds of every optimizer
step (a callback around each step), the first logged record, and the loss of step 1.

    python bench/trl_children.py sft|dpo|rm|grpo SPEC.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

from posttrain.data.loading import load_rows
from posttrain.data.sampler import epoch_batches
from posttrain.models.loading import load_tokenizer
from posttrain.stages import dpo as posttrain_dpo
from posttrain.stages import rm as posttrain_rm
from posttrain.stages import sft as posttrain_sft


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step (for GRPO: generation, scoring and update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def common_args(spec: dict) -> dict:
    """TrainingArguments both frameworks share: fp32 on CPU (TRL defaults to bf16), AdamW, linear decay."""
    return dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, seed=spec["seed"], logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
        train_sampling_strategy="sequential",
    )  # fmt: skip


def in_posttrain_order(dataset, spec: dict, group_by_length: bool):
    """The dataset's rows in the order posttrain's sampler trains on them (epoch 0, global batch = batch)."""
    batches = epoch_batches(list(dataset["length"]), spec["batch"], spec["seed"], 0, group_by_length)
    return dataset.select([i for batch in batches[: spec["steps"]] for i in batch])


def fp32_model(spec: dict):
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)


def run_sft(spec: dict) -> dict:
    from trl import SFTConfig, SFTTrainer

    config = posttrain_sft.SFTConfig(model=spec["model"], data=spec["data"], max_length=spec["max_length"])
    tokenizer = load_tokenizer(spec["model"])
    tokenized = posttrain_sft.prepare(load_rows(spec["data"]), spec["data"], tokenizer, config).dataset
    train = in_posttrain_order(tokenized, spec, group_by_length=False).select_columns(["input_ids", "completion_mask"])
    args = SFTConfig(**common_args(spec), max_length=spec["max_length"], completion_only_loss=True, padding_free=False)
    trainer = SFTTrainer(model=fp32_model(spec), args=args, train_dataset=train, processing_class=tokenizer)
    return train_and_time(trainer)


def run_dpo(spec: dict) -> dict:
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # already posttrain's prompt/chosen/rejected ids
            return dataset

    config = posttrain_dpo.DPOConfig(model=spec["model"], data=spec["data"], max_length=spec["max_length"])
    tokenizer = load_tokenizer(spec["model"])
    tokenized = posttrain_dpo.prepare(load_rows(spec["data"]), spec["data"], tokenizer, config).dataset
    train = in_posttrain_order(tokenized, spec, group_by_length=True)  # posttrain dpo groups by length by default
    train = train.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    args = DPOConfig(**common_args(spec), beta=0.1, loss_type=["sigmoid"], max_length=spec["max_length"],
                     remove_unused_columns=False, precompute_ref_log_probs=False)  # fmt: skip
    trainer = PretokenizedDPOTrainer(model=fp32_model(spec), args=args, train_dataset=train, processing_class=tokenizer)
    return train_and_time(trainer)


def run_rm(spec: dict) -> dict:
    from trl import RewardConfig, RewardTrainer

    config = posttrain_rm.RMConfig(model=spec["model"], data=spec["data"], max_length=spec["max_length"])
    tokenizer = load_tokenizer(spec["model"])
    groups = posttrain_rm.prepare(load_rows(spec["data"]), spec["data"], tokenizer, config).dataset
    groups = in_posttrain_order(groups, spec, group_by_length=True)  # posttrain rm groups by length by default

    def pair(group: dict) -> dict:  # one pair per prompt (distinct prompts): TRL's per-pair mean is posttrain's
        (better,), (worse,) = group["chosen"], group["rejected"]
        prompt, responses = group["prompt_ids"], group["responses"]
        return {"chosen_ids": prompt + responses[better], "rejected_ids": prompt + responses[worse]}

    train = groups.map(pair, remove_columns=groups.column_names)
    args = RewardConfig(**common_args(spec), max_length=spec["max_length"], center_rewards_coefficient=None,
                        remove_unused_columns=False)  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    return train_and_time(trainer)


def vowel_fraction(prompts, completions, **kwargs) -> list[float]:
    """The rule reward of the GRPO comparison (the same as bench/rl_throughput.py's)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in text) / max(len(text), 1) for text in texts]


def run_grpo(spec: dict) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    base = common_args(spec) | {"train_sampling_strategy": "random"}  # GRPO's sampler repeats each prompt
    args = GRPOConfig(**base, num_generations=spec["generations"], max_completion_length=spec["new_tokens"],
                      beta=spec["kl_coef"], loss_type="dapo", temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2,
                      scale_rewards="group", num_iterations=1)  # fmt: skip
    prompts = load_rows(spec["data"]).select_columns(["prompt"])
    trainer = GRPOTrainer(model=fp32_model(spec), reward_funcs=vowel_fraction, args=args, train_dataset=prompts,
                          processing_class=load_tokenizer(spec["model"]))  # fmt: skip
    return train_and_time(trainer)


def train_and_time(trainer) -> dict:
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return {"step_seconds": timer.seconds, "first": logged[0], "records": logged}


def main() -> None:
    stage, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(spec["threads"])
    result = {"sft": run_sft, "dpo": run_dpo, "rm": run_rm, "grpo": run_grpo}[stage](spec)
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
