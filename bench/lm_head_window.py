"""The LM head only where targets are: SFT and DPO loss steps with logits at every position against
logits from the batch's first target position on (``posttrain.ops.logprobs.target_logits``).

Same model, same batches (``bench/trl_compare.py``'s data, in posttrain's order), one process,
the two ways alternating; prints the median seconds of forward + backward (DPO: with the reference
forward), the LM-head FLOPs saved (2·hidden·vocab per skipped position; x3 with the backward for the
policy, x1 for the reference) and the fp32 logits no longer materialised.

    python bench/lm_head_window.py --workdir runs/bench-trl [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from posttrain.data.loading import load_rows
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.reference import Reference, completion_logps
from posttrain.ops.logprobs import first_target_position, sequence_log_probs
from posttrain.ops.losses import shifted_nll_sum
from posttrain.stages import dpo, sft


def full_sft(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return shifted_nll_sum(logits, batch["labels"])[0]


def full_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_log_probs(logits, batch["labels"])[0]


def windowed_dpo(model, reference, batch) -> torch.Tensor:
    with torch.no_grad():
        ref = reference.logps(batch)
    return (completion_logps(model, batch)[0] - ref).sum()


def classic_dpo(model, reference, batch) -> torch.Tensor:
    with torch.no_grad():
        ref = full_logps(reference.model, batch)
    return (full_logps(model, batch) - ref).sum()


WAYS = {  # stage -> way -> loss(model, reference, batch)
    "sft": {
        "every position": lambda m, r, b: full_sft(m, b),
        "target window": lambda m, r, b: sft.sft_loss(m, b).loss_sum,
    },
    "dpo": {"every position": classic_dpo, "target window": windowed_dpo},
}


def timed_step(loss_fn, model) -> float:
    start = time.perf_counter()
    loss_fn().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def skipped(batches, hidden: int, vocab: int, passes: int) -> tuple[float, float, float]:
    """(LM-head GFLOPs saved, of GFLOPs at every position, MiB of fp32 logits saved), summed over batches."""
    rows_positions = [(b["labels"].shape[0], b["labels"].shape[1], first_target_position(b["labels"])) for b in batches]
    per_position = 2 * hidden * vocab * passes / 1e9
    saved = sum(rows * start for rows, _, start in rows_positions) * per_position
    total = sum(rows * width for rows, width, _ in rows_positions) * per_position
    mib = max(rows * start for rows, _, start in rows_positions) * vocab * 4 / 2**20
    return saved, total, mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-trl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    model_dir = str(next(p for p in (workdir / "smollm2-135m", workdir / "tiny") if (p / "config.json").is_file()))
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    reference = Reference(load_model(model_dir).eval().requires_grad_(False))
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    for name, stage, data_file, batch_size in (("sft", sft, "sft.jsonl", 8), ("dpo", dpo, "pairs.jsonl", 4)):
        path = str(workdir / data_file)
        config = (sft.SFTConfig if name == "sft" else dpo.DPOConfig)(model=model_dir, data=path, max_length=512)
        data = stage.prepare(load_rows(path), path, tokenizer, config)
        batches = [
            data.collate(data.dataset[i : i + batch_size]) for i in range(0, args.steps * batch_size, batch_size)
        ]
        ways = WAYS[name]
        seconds = {way: [] for way in ways}
        for batch in batches:
            for way, loss in ways.items():
                seconds[way].append(timed_step(lambda b=batch, f=loss: f(model, reference, b), model))
        saved, total, mib = skipped(batches, hidden, vocab, passes=3 if name == "sft" else 3 + 1)
        times = {way: statistics.median(s[1:]) for way, s in seconds.items()}
        before, after = times["every position"], times["target window"]
        print(f"{name}: median step {before:.3f} s -> {after:.3f} s ({before / after:.2f}x faster)")
        print(f"  LM head: {saved:.1f} of {total:.1f} GFLOP saved over {len(batches)} steps ({saved / total:.0%})")
        print(f"  largest batch: {mib:.0f} MiB less in each fp32 (rows, positions, vocab) logits tensor")


if __name__ == "__main__":
    main()
