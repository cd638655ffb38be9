"""One AdamW update of SmolLM2-135M-Instruct's parameters: the per-parameter loop, ``foreach`` and the fused
kernel posttrain uses (``posttrain.training.optim.build_optimizer``), median of 5 after a warm-up step.

    python bench/optimizer_step.py [--threads 2] [--workdir runs/bench]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from sft_throughput import smollm2
from transformers import AutoModelForCausalLM

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="runs/bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = list(AutoModelForCausalLM.from_pretrained(smollm2(Path(args.workdir))).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{sum(p.numel() for p in params) / 1e6:.0f}M fp32 parameters, {args.threads} threads")
    for name, kind in IMPLEMENTATIONS.items():
        optimizer = torch.optim.AdamW(params, lr=1e-5, **kind)
        optimizer.step()  # allocates the moments
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
        print(f"{name:9} {statistics.median(seconds) * 1e3:6.0f} ms per update")


if __name__ == "__main__":
    main()
