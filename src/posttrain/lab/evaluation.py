"""Measuring the lab's models: answers to held-out questions, the gold judge's metrics, the KL
to the SFT model, and the reward model's agreement with the annotators' labels and with the truth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.instruments.answering import mean_kl
from posttrain.lab import gold, world
from posttrain.ops.answer_rates import Outcome, answer_rates, bootstrap_mean
from posttrain.rewards import model_reward
from posttrain.training.rollout import sample

BATCH = 32


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int


def load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def answers(model_dir: Path, prompts: list[list[dict]], k: int, greedy: bool, seed: int) -> list[list[str]]:
    """``k`` answers per prompt, batched with the KV cache (greedy, or sampled at temperature 1)."""
    model, tokenizer = load(model_dir)
    torch.manual_seed(seed)
    settings = SamplingSettings(temperature=0.0 if greedy else 1.0, top_p=1.0, max_new_tokens=24)
    ids, out = prompt_ids(tokenizer, prompts), [[] for _ in prompts]
    for start in range(0, len(ids), BATCH):
        chunk = [i for i in ids[start : start + BATCH] for _ in range(k)]
        rollout = sample(model, chunk, tokenizer, settings)
        kept = [r[m.bool()] for r, m in zip(rollout.responses, rollout.response_mask, strict=True)]
        for j, text in enumerate(tokenizer.batch_decode(kept, skip_special_tokens=True)):
            out[start + j // k].append(text)
    return out


def kl_to_reference(model_dir: Path, reference_dir: Path, prompts: list[list[dict]], k: int, seed: int) -> float:
    """KL(π‖π_ref) per answer on ``k`` samples per prompt from π (temperature 1): ``answering.mean_kl``."""
    model, tokenizer = load(model_dir)
    reference, _ = load(reference_dir)
    return mean_kl(model, reference, tokenizer, prompt_ids(tokenizer, prompts), k, seed, BATCH, max_new_tokens=24)


def share(judged: list[tuple[world.Question, gold.Judgement]], label: str, known: bool | None) -> float | None:
    """The share of answers with ``label`` among those to known (True), unknowable (False) or all
    (None) questions; None when there are no such questions."""
    chosen = [j for q, j in judged if known is None or q.known == known]
    return sum(j.label == label for j in chosen) / len(chosen) if chosen else None


# The gold judge's labels as the outcomes ``answer_rates`` counts; malformed is neither an answer nor an abstention.
OUTCOMES = {"correct": "correct", "hallucinated": "wrong", "abstained": "abstained", "malformed": "no_answer"}
# The lab's metric -> the rate of ``answer_rates`` it is.
RATES = {"accuracy_known": "accuracy", "abstain_unknowable": "abstention", "hallucination_rate": "hallucination",
         "hallucination_unknowable": "hallucination_unanswerable"}  # fmt: skip


def model_metrics(questions: list[world.Question], judged: list[gold.Judgement]) -> dict:
    """The gold judge's metrics, the rates through ``answer_rates`` (0 for a rate whose questions the
    held-out set lacks), and under ``intervals`` the bootstrap 95% interval of each (None for no questions)."""
    outcomes = [Outcome.from_label(OUTCOMES[j.label], q.known, length=j.n_words)
                for q, j in zip(questions, judged, strict=True)]  # fmt: skip
    rates = answer_rates(outcomes)
    rewards = [gold.gold_reward(j) for j in judged]
    gold_rate = bootstrap_mean(np.array(rewards))
    metrics = {"gold_reward": sum(rewards) / len(rewards)}  # summed in order, as before: the same last digit
    intervals = {"gold_reward": [gold_rate.ci_low, gold_rate.ci_high]}
    for key, name in RATES.items():
        metrics[key] = rates[name].value or 0.0
        intervals[key] = [rates[name].ci_low, rates[name].ci_high] if rates[name].n else None
    no_answer = rates["no_answer"]
    metrics["format_compliance"] = 1 - no_answer.value
    intervals["format_compliance"] = [1 - no_answer.ci_high, 1 - no_answer.ci_low]
    metrics["mean_length"] = rates["mean_length"].value
    intervals["mean_length"] = [rates["mean_length"].ci_low, rates["mean_length"].ci_high]
    return metrics | {"intervals": intervals}


def rollout_metrics(judged: list[tuple[world.Question, gold.Judgement]]) -> dict[str, float | None]:
    """One PPO iteration's rollouts, judged: hallucination rate (all; unknowable questions) and
    abstention on known questions (None where the iteration asked none of that kind)."""
    return {
        "hallucination_rate": share(judged, "hallucinated", None),
        "hallucination_unknowable": share(judged, "hallucinated", False),
        "abstain_known": share(judged, "abstained", True),
    }


def arc(values: list[float], window: int) -> dict[str, float]:
    """The shape of a noisy curve: ``start`` and ``end`` are the means of its first and last
    ``window`` values, ``peak`` the highest mean of ``window`` consecutive values and
    ``peak_index`` where that run begins. Rise then fall: peak above both start and end.

    >>> arc([0, 1, 3, 3, 1, 0], 2)
    {'start': 0.5, 'peak': 3.0, 'peak_index': 2, 'end': 0.5}
    """
    if not 1 <= window <= len(values):
        raise ValueError(f"window must lie in [1, {len(values)}], got {window}")
    means = [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]
    peak = max(range(len(means)), key=means.__getitem__)
    return {"start": means[0], "peak": means[peak], "peak_index": peak, "end": means[-1]}


def evaluate(out: Path, models: dict[str, Path], questions: list[world.Question], the_world, seed: int) -> dict:
    """Greedy answers of every model to the held-out questions, scored by the gold judge; KL to SFT."""
    prompts = [[{"role": "user", "content": q.text}] for q in questions]
    results, samples = {}, {}
    for name, directory in models.items():
        texts = [a[0] for a in answers(directory, prompts, 1, greedy=True, seed=seed)]
        judged = [gold.judge(q, t, the_world) for q, t in zip(questions, texts, strict=True)]
        results[name] = model_metrics(questions, judged)
        results[name]["kl_to_sft"] = kl_to_reference(directory, models["sft"], prompts, 4, seed)
        rows = zip(questions, texts, judged, strict=True)
        samples[name] = [{"question": q.text, "answer": t, "label": j.label} for q, t, j in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    return {"models": results}


def reward_model_accuracy(rm_dir: Path, rows: list[dict], questions: dict[str, world.Question], the_world) -> dict:
    """How often the reward model ranks a labelled pair as the annotator did, and as the truth does.

    rows: preference rows (conversational) of pairs the reward model never trained on.
    Pairs the gold reward ties are left out of the gold accuracy; ``accuracy_vs_labels_untied``
    scores the labels on those same pairs, so the two can be compared.
    """
    reward = model_reward(str(rm_dir), BATCH, torch.device("cpu"))
    prompts = [r["prompt"] for r in rows]
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    agrees = (reward(prompts, chosen) > reward(prompts, rejected)).tolist()
    truth = []
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        question = questions[row["prompt"][0]["content"]]
        judged = gold.judge(question, c, the_world), gold.judge(question, r, the_world)
        truth.append(gold.gold_preference(*judged))
    scored = [(a, t) for a, t in zip(agrees, truth, strict=True) if t != -1]
    return {
        "accuracy_vs_labels": sum(agrees) / len(agrees),
        "accuracy_vs_labels_untied": sum(a for a, _ in scored) / max(len(scored), 1),
        "accuracy_vs_gold": sum(a == (t == 0) for a, t in scored) / max(len(scored), 1),
        "pairs": len(rows),
    }
