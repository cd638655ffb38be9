"""One small interface for sampling completions, and the built-in fast implementation.

A sampler takes a model, tokenized prompts, the tokenizer (for its EOS and pad ids) and the
sampling settings (anything with ``temperature``, ``top_p`` and ``max_new_tokens``: an RL
config), and returns ``Samples``: the ``Rollout`` every stage reads (ids, attention and
response masks, whether each response ended) and, where the sampler has them for free, the
log-probability of each sampled token under logits / temperature.

``generate``: Hugging Face ``model.generate``, as ``rollout.sample``.
``fast``: a decode loop over the model's forward with its KV cache. Identical prompts (the k
samples of a GRPO group) are prefilled once and their cache rows copied; the loop stops as
soon as every row has emitted EOS; the per-step work is whole-batch tensor operations.
Sampling follows ``generate``'s ``_sample`` step for step (float32 logits, temperature then
top-p with the library's own warpers, ``torch.multinomial`` over every row, finished rows
fed the pad token) so it draws the same random numbers: a seed gives the same tokens, except
where the logits differ in their last bits (the prefill runs on fewer rows, a batch-size
dependent matmul blocking) and a draw falls exactly on that difference, which tests/test_rollout_sampler.py
checks does not happen on its seeds. Unlike ``generate``, it ignores a model's
``generation_config`` (a repetition penalty there would change ``generate``'s tokens, not these).

A GPU implementation backed by vLLM plugs in with the same signature; see docs/grpo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from posttrain.training.rollout import Rollout, left_pad, response_mask, sample


class SamplingSettings(Protocol):
    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int


@dataclass
class Samples:
    rollout: Rollout
    log_probs: torch.Tensor | None  # (N, R): log π(y_t) under logits / temperature, 0 past the end; None: not given


class Sampler(Protocol):
    def __call__(self, model, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase,
                 settings: SamplingSettings) -> Samples: ...  # fmt: skip


def generate_sampler(model, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase, settings) -> Samples:
    """Hugging Face ``generate`` (no sampling log-probs: keeping every step's logits costs N·R·V floats)."""
    return Samples(sample(model, prompts, tokenizer, settings), None)


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct prompts in first-seen order and, for each prompt, the index of its copy. (N,)"""
    first: dict[tuple[int, ...], int] = {}
    for prompt in prompts:
        first.setdefault(tuple(prompt), len(first))
    return [list(p) for p in first], torch.tensor([first[tuple(p)] for p in prompts])


def warpers(settings) -> list:
    """The logits warpers ``generate`` applies when sampling with top-k off: temperature, then top-p."""
    chosen = []
    if settings.temperature != 1.0:
        chosen.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_p < 1.0:
        chosen.append(TopPLogitsWarper(settings.top_p))
    return chosen


def next_tokens(logits: torch.Tensor, settings) -> torch.Tensor:
    """One token per row from float32 logits (N, V), as ``generate``'s sampling step draws it. (N,)"""
    if settings.temperature == 0:
        return logits.argmax(-1)
    for warp in warpers(settings):
        logits = warp(None, logits)  # the warpers ignore the ids
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)


def prefill(model, prompts: list[list[int]], pad_id: int):
    """Run each distinct prompt once; its cache rows and last logits copied to every prompt that repeats it.

    Returns (ids (N, P), mask (N, P), last-token logits (N, V) float32, the cache of N rows)."""
    unique, copy_of = distinct_prompts(prompts)
    ids, mask = left_pad(unique, pad_id)  # (G, P)
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # generate's position ids
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    copy_of = copy_of.to(model.device)
    cache = out.cache
    cache.batch_select_indices(copy_of)  # (G, ...) -> (N, ...), one index_select per layer
    logits = out.logits[copy_of, -1].to(torch.float32)
    return ids[copy_of], mask[copy_of], logits, cache


@torch.no_grad()
def fast_sampler(model, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase, settings) -> Samples:
    """Sample one response per prompt with a shared-prefill KV cache; stop when every row has ended."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask, logits, cache = prefill(model, prompts, pad)
    n, width, budget = len(prompts), ids.shape[1], settings.max_new_tokens
    attention = torch.cat([mask, mask.new_ones(n, budget)], dim=1)  # (N, P + R): generate extends it with 1s
    position = mask.sum(-1, keepdim=True)  # (N, 1): next position id
    tokens = torch.full((n, budget), pad, dtype=torch.long, device=ids.device)
    log_probs = torch.zeros((n, budget), device=ids.device)
    running = torch.ones(n, dtype=torch.bool, device=ids.device)
    temperature = settings.temperature or 1.0  # greedy: log-probs of the plain softmax
    steps = 0
    while True:
        token = next_tokens(logits, settings)
        chosen = torch.log_softmax(logits / temperature, dim=-1).gather(1, token[:, None]).squeeze(1)
        token = torch.where(running, token, pad)  # finished rows are fed the pad token, as in generate
        tokens[:, steps], log_probs[:, steps] = token, chosen * running
        running &= token != eos
        steps += 1
        if steps == budget or not running.any():
            break
        out = model(input_ids=token[:, None], attention_mask=attention[:, : width + steps], position_ids=position,
                    cache=cache, use_cache=True)  # fmt: skip
        logits = out.logits[:, -1].to(torch.float32)
        position = position + 1
    responses = tokens[:, :steps]
    resp_mask, ended = response_mask(responses, eos)
    rollout = Rollout(torch.cat([ids, responses], dim=1), torch.cat([mask, resp_mask], dim=1), resp_mask, width, ended)
    return Samples(rollout, log_probs[:, :steps] * resp_mask)


SAMPLERS: dict[str, Sampler] = {"generate": generate_sampler, "fast": fast_sampler}
