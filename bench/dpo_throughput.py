"""DPO pairs per second and peak memory, with and without ``--precompute-ref``.

The same model and preference data are trained three times: with a live reference forward
each step; with ``--precompute-ref`` on an empty cache (the reference runs once over the data
first); and again with the cache warm, as a repeated run or a later epoch finds it. Each run is
its own ``posttrain dpo`` process; pairs per second are read from the run's metrics
(``samples_per_second``, steady windows), peak memory is the process's maximum RSS.

    python bench/dpo_throughput.py [--steps 24] [--model tiny|smollm2] [--workdir runs/bench-dpo]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from sft_throughput import run_measured, smollm2, tiny_model

from posttrain.demo import write_jsonl


def arithmetic_pairs(n: int, seed: int) -> list[dict]:
    """Chosen: the right sum; rejected: a wrong one, as conversational preference rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {wrong}."}],
            }
        )
    return rows


def run_dpo(model: Path, data: Path, output: Path, steps: int, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "posttrain", "dpo", "--model", str(model), "--data", str(data)]
    args += ["--output", str(output), "--overwrite", "--max-steps", str(steps), "--save-steps", "0"]
    args += ["--logging-steps", str(max(steps // 4, 1)), *extra]
    logged, rss, wall = run_measured(args, output)
    steady = [r["samples_per_second"] for r in logged if "samples_per_second" in r][1:]
    return {"pairs_per_second": sum(steady) / len(steady), "peak_rss_mib": rss, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default="runs/bench-dpo")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = arithmetic_pairs(args.steps * args.batch_size, seed=0)  # one epoch: every pair once
    data = write_jsonl(workdir / "pairs.jsonl", rows)
    texts = [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]
    model = tiny_model(workdir, texts) if args.model == "tiny" else smollm2(workdir)
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    common = ["--batch-size", str(args.batch_size), "--cache-dir", str(cache)]
    runs = [("live reference", []), ("--precompute-ref, cold cache", ["--precompute-ref"]),
            ("--precompute-ref, warm cache", ["--precompute-ref"])]  # fmt: skip
    print(f"model: {args.model}, {args.steps} steps of {args.batch_size} pairs")
    print(f"{'run':32} {'pairs/s':>8} {'peak RSS MiB':>13} {'wall s':>8}")
    for name, extra in runs:
        result = run_dpo(model, data, workdir / "out", args.steps, common + extra)
        print(f"{name:32} {result['pairs_per_second']:8.1f} {result['peak_rss_mib']:13.0f} {result['wall']:8.1f}")


if __name__ == "__main__":
    main()
