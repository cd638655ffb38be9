"""Measuring the lab's models: answers to held-out questions, the gold judge's metrics, the KL
to the SFT model, and the reward model's agreement with the annotators' labels and with the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.instruments.answering import SamplingSettings, choice_log_probs, greedy_answers, mean_kl, pick
from posttrain.lab import gold, world
from posttrain.lab.presets import Preset
from posttrain.ops.answer_rates import Outcome, Rate, answer_rates, cluster_mean
from posttrain.ops.calibration import calibration_summary
from posttrain.rewards import model_reward
from posttrain.training.sampler import fast_sampler

BATCH = 32
# The document completer is no policy near SFT: its KL to SFT (about 85 nats) would say nothing and costs the most
# samples (it never ends an answer), so the evaluation leaves it out.
NO_KL = ("base",)


def load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def answers(
    model_dir: Path, prompts: list[list[dict]], k: int, settings: SamplingSettings, seed: int
) -> list[list[str]]:
    """``k`` sampled answers per prompt, batched with the KV cache."""
    model, tokenizer = load(model_dir)
    torch.manual_seed(seed)
    ids, out = prompt_ids(tokenizer, prompts), [[] for _ in prompts]
    for start in range(0, len(ids), BATCH):
        chunk = [i for i in ids[start : start + BATCH] for _ in range(k)]
        rollout = fast_sampler(model, chunk, tokenizer, settings).rollout  # generate's tokens, prompts prefilled once
        kept = [r[m.bool()] for r, m in zip(rollout.responses, rollout.response_mask, strict=True)]
        for j, text in enumerate(tokenizer.batch_decode(kept, skip_special_tokens=True)):
            out[start + j // k].append(text)
    return out


def share(judged: list[tuple[world.Question, gold.Judgement]], label: str, known: bool | None) -> float | None:
    """The share of answers with ``label`` among those to known (True), unknowable (False) or all
    (None) questions; None when there are no such questions."""
    chosen = [j for q, j in judged if known is None or q.known == known]
    return sum(j.label == label for j in chosen) / len(chosen) if chosen else None


# The gold judge's labels as the outcomes ``answer_rates`` counts; malformed is neither an answer nor an abstention.
OUTCOMES = {"correct": "correct", "hallucinated": "wrong", "abstained": "abstained", "malformed": "no_answer"}
STATED = ("correct", "hallucinated")  # the labels of a response that states a value
# The lab's metric -> the rate of ``answer_rates`` it is.
RATES = {"accuracy_known": "accuracy", "abstain_unknowable": "abstention", "hallucination_rate": "hallucination",
         "hallucination_unknowable": "hallucination_unanswerable"}  # fmt: skip


def with_interval(metrics: dict, key: str, rate: Rate) -> None:
    """``metrics[key]`` (0 when no question counts), ``key_ci`` its bootstrap 95% interval (None then) and
    ``key_n`` the number of questions behind it."""
    metrics[key] = rate.value if rate.n else 0.0
    metrics[f"{key}_ci"] = [rate.ci_low, rate.ci_high] if rate.n else None
    metrics[f"{key}_n"] = rate.n


def model_metrics(questions: list[world.Question], judged: list[gold.Judgement], seed: int = 0) -> dict:
    """The gold judge's metrics, the rates through ``answer_rates``, each beside its bootstrap 95%
    interval (``_ci``; facts resampled, with all their phrasings) and its count of questions (``_n``);
    ``n_questions`` and ``n_facts`` in all."""
    outcomes = [Outcome.from_label(OUTCOMES[j.label], q.known, length=j.n_words)
                for q, j in zip(questions, judged, strict=True)]  # fmt: skip
    facts = [q.id for q in questions]  # the phrasings of one fact are resampled together
    rates = answer_rates(outcomes, seed, clusters=facts)
    rewards = [gold.gold_reward(j) for j in judged]
    metrics: dict = {"n_questions": len(questions), "n_facts": len(set(facts))}
    with_interval(metrics, "gold_reward", cluster_mean(np.array(rewards), facts, seed))
    metrics["gold_reward"] = sum(rewards) / len(rewards)  # summed in order: the same last digit as before
    for key, name in RATES.items():
        with_interval(metrics, key, rates[name])
    no_answer = rates["no_answer"]
    complied = Rate(1 - no_answer.value, 1 - no_answer.ci_high, 1 - no_answer.ci_low, no_answer.n)
    with_interval(metrics, "format_compliance", complied)
    with_interval(metrics, "mean_length", rates["mean_length"])
    return metrics


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


def evaluate(out: Path, models: dict[str, Path], reference: Path, questions: list[world.Question], the_world,
             preset: Preset, seed: int) -> dict:  # fmt: skip
    """Greedy answers of every model to the evaluation questions, scored by the gold judge, each with the
    probability the model gave it; the calibration of that confidence on the known questions (Guo et
    al. 2017's ECE); the KL to ``reference`` (the SFT model) on ``preset.kl_samples`` samples a question
    (None for ``NO_KL``)."""
    prompts = [[{"role": "user", "content": q.text}] for q in questions]
    results, samples = {}, {}
    reference_model, _ = load(reference)
    for name, directory in models.items():
        model, tokenizer = load(directory)
        ids = prompt_ids(tokenizer, prompts)
        given = greedy_answers(model, tokenizer, ids, preset.eval_batch_size, preset.max_new_tokens)
        judged = [gold.judge(q, a.text, the_world) for q, a in zip(questions, given, strict=True)]
        results[name] = model_metrics(questions, judged, seed)
        results[name]["calibration"] = calibration(questions, judged, given)
        if preset.eval_choice_calibration:  # about 25 s a model on the quick preset: every value of every known fact
            results[name]["calibration_choice"] = choice_calibration(model, tokenizer, questions, the_world, preset)
        results[name]["kl_to_sft"] = None if name in NO_KL else mean_kl(
            model, reference_model, tokenizer, ids, preset.kl_samples, seed, preset.eval_batch_size,
            preset.max_new_tokens)  # fmt: skip
        rows = zip(questions, given, judged, strict=True)
        samples[name] = [{"question": q.text, "answer": a.text, "label": j.label, "confidence": a.confidence}
                         for q, a, j in rows]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    return {"models": results}


def choice_calibration(model, tokenizer, questions: list[world.Question], the_world, preset: Preset) -> dict:
    """The known questions as multiple choices over every value of their attribute, each in the same plain
    phrasing (``world.candidate_answers``): the pick is the likeliest choice, its confidence the softmax over
    the choices (``answering.pick``), as the GPT-4 technical report reads confidence on MMLU. The phrasing
    is fixed, so the confidence is in the value, not spread over ways of saying it."""
    known = [q for q in questions if q.known]
    ids = prompt_ids(tokenizer, [[{"role": "user", "content": q.text}] for q in known])
    choices = [tuple(world.candidate_answers(q, the_world)) for q in known]
    scores = choice_log_probs(model, tokenizer, ids, choices, True, preset.eval_batch_size)
    picks = [pick(s) for s in scores]  # (index, probability) per question
    truth = [world.candidate_values(q, the_world).index(q.answer) for q in known]
    confidences = np.array([p for _, p in picks], dtype=np.float64)  # (n,)
    correct = np.array([i == t for (i, _), t in zip(picks, truth, strict=True)], dtype=np.float64)  # (n,)
    return calibration_summary(confidences, correct) | {"accuracy": float(correct.mean()) if len(correct) else None}


def calibration(questions: list[world.Question], judged: list[gold.Judgement], given: list) -> dict:
    """On the known questions the model answered (stated a value, right or wrong; an abstention is no
    answer): the probability it gave its greedy answer against whether the answer is correct."""
    rows = zip(questions, judged, given, strict=True)
    answered = [(a.confidence, j.label == "correct") for q, j, a in rows if q.known and j.label in STATED]
    confidences = np.array([c for c, _ in answered], dtype=np.float64)  # (n,)
    correct = np.array([k for _, k in answered], dtype=np.float64)  # (n,)
    return calibration_summary(confidences, correct)


def prefers_chosen(rm_dir: Path, rows: list[dict]) -> list[bool]:
    """Per preference row (conversational): whether the reward model scores the chosen answer above the rejected."""
    if not rows:  # nothing to rank: on the smoke preset every pair may be a tie
        return []
    reward = model_reward(str(rm_dir), BATCH, torch.device("cpu"))
    prompts = [r["prompt"] for r in rows]
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    return (reward(prompts, chosen) > reward(prompts, rejected)).tolist()


def reward_model_accuracy(rm_dir: Path, rows: list[dict], questions: dict[str, world.Question], the_world) -> dict:
    """How often the reward model ranks a labelled pair as the annotator did, and as the truth does.

    rows: preference rows (conversational) of pairs the reward model never trained on.
    Pairs the gold reward ties are left out of the gold accuracy; ``accuracy_vs_labels_untied``
    scores the labels on those same pairs, so the two can be compared.
    """
    agrees = prefers_chosen(rm_dir, rows)
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    truth = []
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        question = questions[row["prompt"][0]["content"]]
        judged = gold.judge(question, c, the_world), gold.judge(question, r, the_world)
        truth.append(gold.gold_preference(*judged))
    scored = [(a, t) for a, t in zip(agrees, truth, strict=True) if t is not None]
    return {
        "accuracy_vs_labels": sum(agrees) / len(agrees),
        "accuracy_vs_labels_untied": sum(a for a, _ in scored) / max(len(scored), 1),
        "accuracy_vs_gold": sum(a == (t == 0) for a, t in scored) / max(len(scored), 1),
        "pairs": len(rows),
    }
