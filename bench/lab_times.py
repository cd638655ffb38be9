"""Wall time of the lab, stage by stage: runs ``posttrain lab`` in a new directory and prints the
seconds each step took (from its ``summary.json``) and the total.

    python bench/lab_times.py [--preset quick] [--seed 0] [--workdir runs/bench-lab]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/bench-lab")
    args = parser.parse_args()
    output = Path(args.workdir) / f"{args.preset}-{args.seed}"
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    command = [sys.executable, "-m", "posttrain", "lab", "--output", str(output), "--preset", args.preset]
    subprocess.run(
        [*command, "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    total = time.perf_counter() - start
    seconds = json.loads((output / "summary.json").read_text())["seconds"]
    for step, value in seconds.items():
        print(f"{step:12} {value:7.1f} s")
    print(f"{'total':12} {total:7.1f} s (wall, with start-up and the report)")


if __name__ == "__main__":
    main()
