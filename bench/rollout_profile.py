"""Where a rollout's time goes: one decode step split into the layers and the LM head at 1, 8 and 32
rows, the rate at which cold weights are read, the operators of one fast-sampler rollout
(``torch.profiler``), and optionally what ``torch.compile`` of the forward costs and gains.

A GRPO-shaped rollout of SmolLM2-135M-Instruct (2 conversational prompts x 4 generations, temperature
1, 32 new tokens), fp32, ``--threads`` threads. The machine's fp32 GEMM peak and copy bandwidth
are measured in the same run.

    python bench/rollout_profile.py [--threads 2] [--compile] [--workdir runs/bench-rollout]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
from sft_throughput import smollm2
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_compare import copy_gbytes, gemm_gflops, timed

from posttrain.demo import arithmetic_rows
from posttrain.training.sampler import fast_sampler

PROMPT = 40  # tokens, about the chat-templated arithmetic prompts


@torch.no_grad()
def decode_split(model, rows: int, steps: int = 8) -> tuple[float, float]:
    """Median seconds of one decode step's 30 layers and of its LM head, after a prefill of PROMPT tokens."""
    cache = model(input_ids=torch.randint(0, 1000, (rows, PROMPT)), use_cache=True, logits_to_keep=1).cache
    token, body, head = torch.randint(0, 1000, (rows, 1)), [], []
    for _ in range(steps):
        start = time.perf_counter()
        hidden = model.model(input_ids=token, cache=cache, use_cache=True).last_hidden_state
        middle = time.perf_counter()
        model.lm_head(hidden)
        body.append(middle - start)
        head.append(time.perf_counter() - middle)
    return statistics.median(body), statistics.median(head)


def cold_read_gbytes(shape: tuple[int, int], copies: int, rows: int) -> float:
    """GB/s of weights read by ``linear`` with ``rows`` inputs when the weights are not in cache."""
    weights = [torch.randn(shape) for _ in range(copies)]
    inputs = torch.randn(rows, shape[1])
    for weight in weights[:2]:
        torch.nn.functional.linear(inputs, weight)
    seconds = min(timed(lambda: [torch.nn.functional.linear(inputs, w) for w in weights]) for _ in range(3))
    return copies * shape[0] * shape[1] * 4 / seconds / 1e9


def op_table(model, prompts, tokenizer, settings) -> str:
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast_sampler(model, prompts, tokenizer, settings)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


@torch.no_grad()
def compiled_steps(model, rows: int = 8, steps: int = 16) -> None:
    """Compile seconds (the first step) and median step before and after ``torch.compile(dynamic=True)``."""

    def run(forward) -> list[float]:
        cache = model(input_ids=torch.randint(0, 1000, (rows, PROMPT)), use_cache=True, logits_to_keep=1).cache
        token = torch.randint(0, 1000, (rows, 1))
        return [timed(lambda: forward(input_ids=token, cache=cache, use_cache=True)) for _ in range(steps)]

    eager = run(model)
    compiled = run(torch.compile(model, dynamic=True))
    again = run(torch.compile(model, dynamic=True))  # already compiled: a second rollout
    print(f"torch.compile: first step (compiling) {compiled[0]:.0f} s; median step eager "
          f"{statistics.median(eager[1:]) * 1e3:.0f} ms, compiled {statistics.median(compiled[1:]) * 1e3:.0f} ms, "
          f"compiled again {statistics.median(again) * 1e3:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    parser.add_argument("--workdir", default="runs/bench-rollout")
    args = parser.parse_args()
    print(f"machine: fp32 GEMM {gemm_gflops(args.threads):.0f} GFLOP/s, copy {copy_gbytes(args.threads):.1f} GB/s "
          f"(read + write), {args.threads} threads")  # fmt: skip
    directory = smollm2(Path(args.workdir))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    for rows in (1, 8, 32):
        body, head = decode_split(model, rows)
        print(f"decode step, {rows:2d} rows: 30 layers {body * 1e3:.0f} ms, LM head {head * 1e3:.0f} ms "
              f"({rows / (body + head):.0f} tokens/s)")  # fmt: skip
    for shape, copies in (((1536, 576), 60), ((49152, 576), 2)):
        rates = ", ".join(f"{rows} rows {cold_read_gbytes(shape, copies, rows):.1f}" for rows in (1, 8))
        print(f"cold weights {shape[0]}x{shape[1]} read by linear (GB/s): {rates}")
    chats = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in arithmetic_rows(2, seed=0)]  # fmt: skip
    prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats for _ in range(4)]
    print(op_table(model, prompts, tokenizer, types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=32)))
    if args.compile:
        compiled_steps(model)


if __name__ == "__main__":
    main()
