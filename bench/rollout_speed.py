"""Rollout sampling speed: Hugging Face ``generate`` against the fast sampler, in one process.

A GRPO-shaped rollout (4 conversational arithmetic prompts x 4 generations, temperature 0.7,
up to 32 new tokens) is sampled by each sampler in turn, same seed, ``--repeats`` times,
alternating so that a busy machine slows both alike. Reported: the median of generated tokens
(up to and including EOS) per second of sampling, and whether both gave the same tokens.

    python bench/rollout_speed.py [--model tiny|smollm2] [--repeats 3] [--threads 2] [--workdir runs/bench-rollout]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
from sft_throughput import smollm2, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.demo import arithmetic_rows
from posttrain.training.sampler import SAMPLERS


def timed(name: str, model, prompts, tokenizer, settings, seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    rollout = SAMPLERS[name](model, prompts, tokenizer, settings).rollout
    return rollout, int(rollout.response_mask.sum()) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", default="runs/bench-rollout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    rows = arithmetic_rows(64, seed=0)
    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    directory = tiny_model(workdir, texts) if args.model == "tiny" else smollm2(workdir)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    chats = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows[:4]]
    prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats for _ in range(4)]
    settings = types.SimpleNamespace(temperature=0.7, top_p=1.0, max_new_tokens=args.new_tokens)
    speeds, same = {"generate": [], "fast": []}, True
    for seed in range(args.repeats):
        expected = timed("generate", model, prompts, tokenizer, settings, seed)
        got = timed("fast", model, prompts, tokenizer, settings, seed)
        speeds["generate"].append(expected[1])
        speeds["fast"].append(got[1])
        same &= torch.equal(expected[0].sequences, got[0].sequences)
        print(f"repeat {seed}: generate {expected[1]:.1f} tok/s, fast {got[1]:.1f} tok/s", flush=True)
    generate, fast = statistics.median(speeds["generate"]), statistics.median(speeds["fast"])
    print(f"model {args.model}, {args.threads} threads, {args.repeats} repeats: median generate {generate:.1f} tok/s, "
          f"fast {fast:.1f} tok/s ({fast / generate:.1f}x); same tokens: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
