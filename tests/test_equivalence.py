"""Equivalences of the shipped loop: accumulation vs a larger batch, padded vs unpadded,
packed vs unpacked, resumed vs uninterrupted, 2 processes vs 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import qa_rows, write_jsonl
from posttrain.data.loading import load_rows
from posttrain.models.loading import load_tokenizer
from posttrain.stages.sft import SFTConfig, prepare, sft_loss
from posttrain.training.loop import EpochOrder, accumulate, make_plan, step_micro_batches

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sft_data(tiny_model: Path, tmp_path: Path, n: int = 64, **overrides):
    config = SFTConfig(model=str(tiny_model), data=str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(n))), output="unused")
    for key, value in overrides.items():
        setattr(config, key, value)
    tokenizer = load_tokenizer(str(tiny_model))
    return config, prepare(load_rows(config.data), config.data, tokenizer, config)


def accumulated_grads(tiny_model: Path, data, config: SFTConfig) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of optimizer step 1 through the loop's own batching and accumulation."""
    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    plan = make_plan(len(data.dataset), config, world_size=1)
    batch = EpochOrder(data, plan, config).global_batch(1)
    sums = accumulate(model, step_micro_batches(data, batch, config, accelerator), sft_loss, accelerator)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, sums["loss"] / sums["n_targets"]


def test_grad_accumulation_4x2_equals_1x8(tiny_model, tmp_path):
    config, data = sft_data(tiny_model, tmp_path)
    config.batch_size, config.grad_accum = 2, 4
    small, loss_small = accumulated_grads(tiny_model, data, config)
    config.batch_size, config.grad_accum = 8, 1
    large, loss_large = accumulated_grads(tiny_model, data, config)
    assert abs(loss_small - loss_large) < 1e-6
    for name in large:
        torch.testing.assert_close(small[name], large[name], atol=1e-6, rtol=0, msg=name)


def test_padding_and_packing_do_not_change_the_loss(tiny_model, tmp_path):
    config, data = sft_data(tiny_model, tmp_path, n=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    alone = sum(sft_loss(model, data.collate(data.dataset[[i]])).loss_sum.item() for i in range(8))
    padded = sft_loss(model, data.collate(data.dataset[list(range(8))])).loss_sum.item()
    config.packing, config.max_length = True, 64
    _, packed_data = sft_data(tiny_model, tmp_path, n=8, packing=True, max_length=64)
    assert len(packed_data.dataset) < 8  # several examples share a row
    packed = sft_loss(model, packed_data.collate(packed_data.dataset[:])).loss_sum.item()
    assert abs(padded - alone) < 1e-6 * alone
    assert abs(packed - alone) < 1e-5 * alone


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", "sft", *args]


def sft_args(tiny_model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return cli(
        "--model", str(tiny_model), "--data", str(data), "--output", str(output),
        "--learning-rate", "1e-3", "--seed", "7", "--logging-steps", "5", *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(256))
    steps = ["--max-steps", "400", "--batch-size", "4", "--save-steps", "10", "--lr-scheduler", "cosine"]
    subprocess.run(sft_args(tiny_model, data, tmp_path / "full", *steps), env=ENV, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(sft_args(tiny_model, data, interrupted, *steps), env=ENV, stderr=subprocess.DEVNULL)
    while not list((interrupted / "checkpoints").glob("step-*")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (interrupted / "model.safetensors").exists()

    resumed = subprocess.run(sft_args(tiny_model, data, interrupted, *steps, "--resume"), env=ENV, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    steps_logged = [line for line in (interrupted / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps_logged) == 400 // 5  # each logging step once, none lost or doubled


@pytest.mark.slow
def test_two_processes_match_one_and_resume_exactly(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    common = ["--max-steps", "6", "--grad-accum", "2"]
    one = subprocess.run(
        sft_args(tiny_model, data, tmp_path / "one", *common, "--batch-size", "4", "--save-steps", "0"),
        env=ENV,
        capture_output=True,
    )
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    # accelerate's --cpu flag starts one process; --multi_gpu starts two, which posttrain runs on the CPU
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain", "sft",
    ]  # fmt: skip

    def two_processes(output: Path, *extra: str) -> None:
        argv = sft_args(tiny_model, data, output, *common, "--batch-size", "2", "--save-steps", "3", *extra)
        run = subprocess.run(launch + argv[len(cli()) :], env=ENV, capture_output=True)
        assert run.returncode == 0, run.stderr.decode()[-2000:]

    two_processes(tmp_path / "two")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    losses = [[line for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(losses[0]) == len(losses[1])
    # the main process wrote the checkpoint alone, with both processes' RNG states
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000003"
    assert {"rng-0.json", "rng-1.json", "rng-0.safetensors", "rng-1.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    # resumed from that checkpoint with two processes: the same weights, bit for bit
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two", cut)
    (cut / "model.safetensors").unlink()
    two_processes(cut, "--resume")
    resumed = load_file(cut / "model.safetensors")
    for name in b:
        assert torch.equal(b[name], resumed[name]), name
