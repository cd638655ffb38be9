"""The fast sampler draws the very tokens Hugging Face ``generate`` draws, prefills each distinct
prompt once, stops when every row has ended, and returns the log-probs a scoring forward gives."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.training.rollout import (
    batched_log_probs,
    group_log_probs,
    group_response_logits,
    response_log_probs,
    response_logits,
    shared_prompt_mask,
)
from posttrain.training.sampler import distinct_prompts, fast_sampler, generate_sampler

TEXTS = ["the cat sat", "a dog", "one two three four five", "a"]


def load(directory, eos_bias: float = 2.5):
    """The tiny model with ``eos_bias`` added to its EOS logit, so that completions end early."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS for _ in range(3)]  # groups of 3, as GRPO asks
    return model, tokenizer, prompts


def settings(temperature: float, top_p: float, max_new_tokens: int = 20):
    return types.SimpleNamespace(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


def both(model, tokenizer, prompts, config, seed: int):
    torch.manual_seed(seed)
    expected = generate_sampler(model, prompts, tokenizer, config)
    torch.manual_seed(seed)
    return expected, fast_sampler(model, prompts, tokenizer, config)


def assert_same_rollout(a, b) -> None:
    assert a.prompt_length == b.prompt_length
    for name in ("sequences", "attention", "response_mask", "ended"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_distinct_prompts_by_hand():
    unique, copy_of = distinct_prompts([[5, 6], [7], [5, 6], [7], [8, 9, 1]])
    assert unique == [[5, 6], [7], [8, 9, 1]]
    assert copy_of.tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.5)])
def test_same_tokens_as_generate(tiny_model, temperature, top_p):
    model, tokenizer, prompts = load(tiny_model)
    ended = 0
    for seed in range(3):
        expected, got = both(model, tokenizer, prompts, settings(temperature, top_p), seed)
        assert_same_rollout(expected.rollout, got.rollout)
        ended += int(got.rollout.ended.sum())
    if temperature > 0:
        assert ended > 0, "the check must cover rows that end early"


def test_same_tokens_when_pad_is_eos(tiny_model_pad_eos):
    model, tokenizer, prompts = load(tiny_model_pad_eos)
    for seed in range(3):
        expected, got = both(model, tokenizer, prompts, settings(0.8, 0.95), seed)
        assert_same_rollout(expected.rollout, got.rollout)


def test_stops_when_every_row_has_ended(tiny_model):
    model, tokenizer, prompts = load(tiny_model, eos_bias=8.0)  # EOS nearly certain
    expected, got = both(model, tokenizer, prompts, settings(1.0, 1.0, max_new_tokens=40), seed=0)
    assert_same_rollout(expected.rollout, got.rollout)
    assert bool(got.rollout.ended.all())
    assert got.rollout.responses.shape[1] < 40  # no step past the last EOS


def test_each_distinct_prompt_is_prefilled_once(tiny_model):
    model, tokenizer, prompts = load(tiny_model)
    rows = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)  # fmt: skip
    try:
        fast_sampler(model, prompts, tokenizer, settings(0.7, 1.0, max_new_tokens=5))
    finally:
        hook.remove()
    assert rows[0][0] == len(TEXTS)  # the prefill: one row per distinct prompt
    assert all(shape == (len(prompts), 1) for shape in rows[1:])  # decode: one token for every row


def test_log_probs_match_a_scoring_forward(tiny_model):
    model, tokenizer, prompts = load(tiny_model)
    torch.manual_seed(0)
    samples = fast_sampler(model, prompts, tokenizer, settings(0.7, 0.9))
    scored = batched_log_probs(model, samples.rollout, 0.7, batch_size=5)
    torch.testing.assert_close(samples.log_probs, scored, atol=1e-5, rtol=1e-5)
    assert bool((samples.log_probs[samples.rollout.response_mask == 0] == 0).all())


@pytest.mark.parametrize("batch_size", [2, 5, 12])  # a group split across chunks, whole groups, all at once
def test_group_log_probs_match_the_full_forward(tiny_model, batch_size):
    model, tokenizer, prompts = load(tiny_model)  # 4 prompts of different lengths, 3 rows each
    torch.manual_seed(1)
    rollout = fast_sampler(model, prompts, tokenizer, settings(1.0, 1.0)).rollout
    assert rollout.prompt_length > min(len(p) for p in prompts)  # left padding is covered
    expected = batched_log_probs(model, rollout, 0.7, batch_size=4)
    got = group_log_probs(model, rollout, 3, 0.7, batch_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool((got[rollout.response_mask == 0] == 0).all())


def test_group_log_probs_run_each_prompt_once(tiny_model):
    model, tokenizer, prompts = load(tiny_model)
    rollout = fast_sampler(model, prompts, tokenizer, settings(1.0, 1.0, max_new_tokens=6)).rollout
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)  # fmt: skip
    try:
        group_log_probs(model, rollout, 3, 1.0, batch_size=12)
    finally:
        hook.remove()
    responses = rollout.sequences.shape[1] - rollout.prompt_length
    assert shapes == [(len(TEXTS), rollout.prompt_length + 3 * responses)]  # one packed row per group


def test_shared_prompt_mask_by_hand():
    # one group: a prompt of 3 slots (the first is padding), k = 2 responses of 2 slots (the second
    # response ended after 1 token): [pad p1 p2 | a1 a2 | b1 pad]
    prompt = torch.tensor([[0, 1, 1]])
    responses = torch.tensor([[[1, 1], [1, 0]]])
    expected = torch.tensor(
        [  # keys: pad p1 p2 a1 a2 b1 pad
            [1, 0, 0, 0, 0, 0, 0],  # pad: itself only
            [0, 1, 0, 0, 0, 0, 0],  # p1
            [0, 1, 1, 0, 0, 0, 0],  # p2
            [0, 1, 1, 1, 0, 0, 0],  # a1: the prompt, itself
            [0, 1, 1, 1, 1, 0, 0],  # a2: the prompt, a1, itself
            [0, 1, 1, 0, 0, 1, 0],  # b1: the prompt, itself, never a1 or a2
            [0, 1, 1, 0, 0, 1, 1],  # the pad after b1: the prompt, b1, itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(shared_prompt_mask(prompt, responses), expected[None, None])


def test_group_response_logits_match_the_full_forward_with_gradients(tiny_model):
    model, tokenizer, prompts = load(tiny_model)
    torch.manual_seed(2)
    rollout = fast_sampler(model, prompts, tokenizer, settings(1.0, 1.0, max_new_tokens=8)).rollout
    mask = rollout.response_mask.float()
    model.train()
    full = (response_log_probs(response_logits(model, rollout), rollout, 1.0) * mask).sum()
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    shared = (response_log_probs(group_response_logits(model, rollout, 3), rollout, 1.0) * mask).sum()
    shared.backward()
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
