"""PPO and GRPO throughput: rollout tokens per second and optimisation samples per second.

Each run is its own ``posttrain ppo`` / ``posttrain grpo`` process with a rule-based reward
(the fraction of vowels in the completion) and conversational arithmetic prompts. Figures are
averaged over the iterations after the first (warm-up): ``rollout_tokens_per_second`` counts
generated tokens over the whole rollout phase (batched sampling with the KV cache, then the
batched policy, reference, value and reward forwards); ``samples_per_second`` counts completions
times PPO epochs over the optimisation phase.

    python bench/rl_throughput.py [--model tiny|smollm2] [--steps 4] [--workdir runs/bench-rl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_throughput import run_measured, smollm2, tiny_model

from posttrain.demo import arithmetic_rows, write_jsonl

RULES = """def vowel_fraction(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
"""


def run(command: str, model: Path, prompts: Path, rules: Path, output: Path, args) -> dict:
    cli = [sys.executable, "-m", "posttrain", command, "--model", str(model), "--prompts", str(prompts),
           "--reward", f"{rules}:vowel_fraction", "--output", str(output), "--overwrite", "--save-steps", "0",
           "--max-steps", str(args.steps), "--max-new-tokens", str(args.new_tokens), "--batch-size", "8"]  # fmt: skip
    cli += ["--rollout-prompts", "16"] if command == "ppo" else ["--rollout-prompts", "4", "--num-generations", "4"]
    records, rss, wall = run_measured(cli, output)
    records = records[1:]  # the first iteration warms up
    return {
        "rollout": sum(r["rollout_tokens_per_second"] for r in records) / len(records),
        "optimise": sum(r["samples_per_second"] for r in records) / len(records),
        "rss": rss,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", default="runs/bench-rl")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = arithmetic_rows(256, seed=0)
    prompts = write_jsonl(workdir / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    rules = workdir / "rules.py"
    rules.write_text(RULES)
    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    model = tiny_model(workdir, texts) if args.model == "tiny" else smollm2(workdir)
    print(f"model: {args.model}; {args.steps} iterations of 16 completions, up to {args.new_tokens} new tokens")
    print(f"{'stage':6} {'rollout tok/s':>14} {'optim samples/s':>16} {'peak RSS MiB':>13} {'wall s':>8}")
    for command in ("ppo", "grpo"):
        r = run(command, model, prompts, rules, workdir / command, args)
        print(f"{command:6} {r['rollout']:14.1f} {r['optimise']:16.1f} {r['rss']:13.0f} {r['wall']:8.1f}")


if __name__ == "__main__":
    main()
