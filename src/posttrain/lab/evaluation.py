"""Measuring the lab's models: answers to held-out questions, the gold judge's metrics, the KL
to the SFT model, and the reward model's agreement with the annotators' labels and with the truth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.lab import gold, world
from posttrain.rewards import model_reward
from posttrain.training.rollout import batched_log_probs, sample

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


@torch.no_grad()
def kl_to_reference(model_dir: Path, reference_dir: Path, prompts: list[list[dict]], k: int, seed: int) -> float:
    """KL(π‖π_ref) per answer, estimated on ``k`` samples per prompt from π (temperature 1):
    the mean over samples of Σ_t log π(y_t) − log π_ref(y_t) (the unbiased k1 estimator)."""
    model, tokenizer = load(model_dir)
    reference, _ = load(reference_dir)
    torch.manual_seed(seed)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=24)
    ids, total, count = prompt_ids(tokenizer, prompts), 0.0, 0
    for start in range(0, len(ids), BATCH):
        rollout = sample(model, [i for i in ids[start : start + BATCH] for _ in range(k)], tokenizer, settings)
        ratio = batched_log_probs(model, rollout, 1.0, BATCH) - batched_log_probs(reference, rollout, 1.0, BATCH)
        total += (ratio * rollout.response_mask).sum().item()
        count += len(rollout.sequences)
    return total / count


def share(judged: list[tuple[world.Question, gold.Judgement]], label: str, known: bool | None) -> float | None:
    """The share of answers with ``label`` among those to known (True), unknowable (False) or all
    (None) questions; None when there are no such questions."""
    chosen = [j for q, j in judged if known is None or q.known == known]
    return sum(j.label == label for j in chosen) / len(chosen) if chosen else None


def model_metrics(questions: list[world.Question], judged: list[gold.Judgement]) -> dict[str, float]:
    pairs = list(zip(questions, judged, strict=True))

    def of(label: str, known: bool | None) -> float:  # 0 where the held-out set has no such question
        return share(pairs, label, known) or 0.0

    return {
        "gold_reward": sum(gold.gold_reward(j) for j in judged) / len(judged),
        "accuracy_known": of("correct", True),
        "abstain_unknowable": of("abstained", False),
        "hallucination_rate": of("hallucinated", None),
        "hallucination_unknowable": of("hallucinated", False),
        "format_compliance": 1 - of("malformed", None),
        "mean_length": sum(j.n_words for j in judged) / len(judged),
    }


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
