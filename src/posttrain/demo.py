"""The demo: a raw model learns to answer arithmetic questions through SFT, on CPU in about a minute.

Everything is made here (no downloads): question-answer conversations, a BPE tokenizer
trained on them, and a randomly initialised Llama. The SFT run goes through the same
library function as ``posttrain sft``; before and after, the demo asks held-out
questions and counts exact answers that end with EOS.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.factory import build_llama, train_tokenizer
from posttrain.stages.sft import SFTConfig, run_sft


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """Conversational prompt-completion rows: ``What is a plus b?`` -> ``a plus b is c.``"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def exact_answers(model_dir: Path, rows: list[dict]) -> tuple[float, str]:
    """Share of rows answered exactly (then EOS) by greedy decoding, and one sample answer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    correct, sample = 0, ""
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1] :])
        correct += answer == row["completion"][0]["content"] + tokenizer.eos_token
        sample = sample or f"{row['prompt'][0]['content']} -> {answer!r}"
    return correct / len(rows), sample


def run_demo(output: Path, steps: int = 300) -> None:
    train_rows, eval_rows = arithmetic_rows(4000, seed=0), arithmetic_rows(100, seed=1)
    train_file = write_jsonl(output / "data" / "train.jsonl", train_rows)
    eval_file = write_jsonl(output / "data" / "eval.jsonl", eval_rows)
    texts = [m["content"] for r in train_rows for m in r["prompt"] + r["completion"]]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    base = output / "base"
    build_llama(tokenizer, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = SFTConfig(
        model=str(base),
        data=str(train_file),
        eval_data=str(eval_file),
        output=str(output / "sft"),
        max_steps=steps,
        batch_size=32,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        logging_steps=25,
        eval_steps=100,
        save_steps=0,
        overwrite=True,
    )
    sft = run_sft(config)
    for name, directory in (("base", base), ("sft", sft)):
        accuracy, sample = exact_answers(directory, eval_rows[:50])
        print(f"{name:>4}: exact answers {accuracy:.0%} of 50 held-out questions; e.g. {sample}")
    print(f"metrics: {sft / 'metrics.jsonl'}")
