"""A model answering questions: greedy answers with the probability it gave them, multiple-choice
picks by likelihood, and the KL to a reference model on answers it samples.

Confidence of a free-form answer y = (y_1 .. y_T), the greedy response with its end-of-sequence
token when it emitted one: π(y | x) = Π_t π(y_t | x, y_<t), and per token the geometric mean
π(y | x)^(1/T), which does not shrink with the answer's length.

Confidence of a multiple-choice pick: each choice c is scored as the continuation of the prompt,
s_c = Σ_t log π(c_t | x, c_<t) (a string prompt is followed by a space, then the choice; a chat
prompt by the assistant turn's opening, then the choice), and p_c = softmax(s)_c over the choices;
the pick is the argmax, its confidence p_pick. This is how the GPT-4 technical report (OpenAI 2023)
reads a model's confidence on MMLU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import softmax

from posttrain.data.collate import pad_batch
from posttrain.models.reference import completion_logps
from posttrain.training.rollout import batched_log_probs
from posttrain.training.sampler import fast_sampler


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class Answer:
    """A response and its log-probability: Σ_t log π(y_t) over its ``n_tokens`` tokens."""

    text: str
    log_prob: float
    n_tokens: int

    @property
    def confidence(self) -> float:
        return math.exp(self.log_prob)

    @property
    def confidence_per_token(self) -> float:
        return math.exp(self.log_prob / self.n_tokens)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int) -> list[Answer]:
    """One greedy answer per prompt, ``batch_size`` prompts at a time with the KV cache, each with the
    log-probability the model gave its tokens (at temperature 1, as the model's own distribution), read
    from the sampler's logits rather than a second forward."""
    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        samples = fast_sampler(model, prompt_ids[start : start + batch_size], tokenizer, settings)
        rollout, log_probs = samples.rollout, samples.log_probs  # (N, R), 0 past each answer's end
        totals, lengths = log_probs.sum(-1).tolist(), rollout.response_mask.sum(-1).tolist()  # (N,), (N,)
        kept = [r[m.bool()] for r, m in zip(rollout.responses, rollout.response_mask, strict=True)]
        texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
        answers += [Answer(*row) for row in zip(texts, totals, lengths, strict=True)]
    return answers


def continuation(choice: str, conversational: bool) -> str:
    """The text that follows the prompt when scoring a choice (see the module docstring)."""
    return choice if conversational else " " + choice


@torch.no_grad()
def choice_log_probs(model, tokenizer, prompt_ids: list[list[int]], choices: list[tuple[str, ...]],
                     conversational: bool, batch_size: int) -> list[np.ndarray]:  # fmt: skip
    """s_c = Σ_t log π(c_t | x, c_<t) for every choice of every question: one array (n_choices,) a question."""
    rows, owners = [], []  # one row per (question, choice)
    for question, (ids, options) in enumerate(zip(prompt_ids, choices, strict=True)):
        for option in options:
            answer = tokenizer(continuation(option, conversational), add_special_tokens=False)["input_ids"]
            rows.append((ids + answer, [0] * len(ids) + [1] * len(answer)))
            owners.append(question)
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = pad_batch({"input_ids": [r[0] for r in chunk], "completion_mask": [r[1] for r in chunk]}, 0)
        batch = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "labels")}
        scores += completion_logps(model, batch)[0].tolist()
    per_question: list[list[float]] = [[] for _ in prompt_ids]
    for owner, score in zip(owners, scores, strict=True):
        per_question[owner].append(score)
    return [np.array(s) for s in per_question]


def pick(scores: np.ndarray) -> tuple[int, float]:
    """The choice with the highest log-likelihood and its probability, softmax over the choices. (C,) -> (i, p)"""
    probabilities = softmax(scores)  # (C,)
    best = int(np.argmax(probabilities))
    return best, float(probabilities[best])


@torch.no_grad()
def mean_kl(model, reference, tokenizer, prompt_ids: list[list[int]], k: int, seed: int, batch_size: int,
            max_new_tokens: int) -> float:  # fmt: skip
    """KL(π‖π_ref) per answer, estimated on ``k`` samples per prompt from π at temperature 1: the mean
    over samples of Σ_t log π(y_t) − log π_ref(y_t), the unbiased k1 estimator (Schulman 2020,
    "Approximating KL Divergence"). ``batch_size`` prompts (times k samples) are sampled at once; log π
    comes from the sampler, log π_ref from one forward of the reference."""
    torch.manual_seed(seed)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    total, count = 0.0, 0
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [ids for ids in prompt_ids[start : start + batch_size] for _ in range(k)]
        samples = fast_sampler(model, chunk, tokenizer, settings)  # its log-probs are π's at temperature 1
        rollout = samples.rollout
        log_ratio = samples.log_probs - batched_log_probs(reference, rollout, 1.0, batch_size)  # (N, R), 0 past the end
        total += (log_ratio * rollout.response_mask).sum().item()
        count += len(rollout.sequences)
    return total / count
