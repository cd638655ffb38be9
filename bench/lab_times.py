"""Wall time of the lab, step by step, or of a lab experiment, arm by arm: runs ``posttrain lab`` in a new
directory, then prints the seconds each step (or arm) took and the total, beside this machine's fp32 GEMM
peak measured in the same run (the times scale with it: compare hosts by the ratio).

    python bench/lab_times.py [--preset quick] [--seed 0] [--workdir runs/bench-lab]
    python bench/lab_times.py --experiment kl-sweep [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trl_compare import gemm_gflops


def lab_command(args, output: Path) -> list[str]:
    command = [sys.executable, "-m", "posttrain", "lab", "--output", str(output), "--preset", args.preset]
    if args.experiment:
        return [*command, "--experiment", args.experiment, "--seeds", args.seeds]
    return [*command, "--seed", str(args.seed)]


def step_seconds(output: Path, experiment: bool) -> dict[str, float]:
    """Seconds per step of a lab run, or per arm and seed of an experiment (its own steps)."""
    if not experiment:
        return json.loads((output / "summary.json").read_text())["seconds"]
    results = json.loads((output / "experiment.json").read_text())["results"]
    return {f"{arm} seed {i}": r["seconds"] for arm, per_seed in results.items() for i, r in enumerate(per_seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workdir", default="runs/bench-lab")
    parser.add_argument("--threads", type=int, default=2, help="for the GEMM peak (the lab uses torch's default)")
    args = parser.parse_args()
    name = args.experiment or "lab"
    output = Path(args.workdir) / f"{name}-{args.preset}-{args.seeds if args.experiment else args.seed}"
    shutil.rmtree(output, ignore_errors=True)
    peak = gemm_gflops(args.threads)
    start = time.perf_counter()
    subprocess.run(lab_command(args, output), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    for step, value in step_seconds(output, bool(args.experiment)).items():
        print(f"{step:32} {value:7.1f} s")
    print(f"{'total':32} {total:7.1f} s (wall, with start-up and the report)")
    print(f"machine: fp32 GEMM {peak:.0f} GFLOP/s ({args.threads} threads, 2048², best of 10)")


if __name__ == "__main__":
    main()
