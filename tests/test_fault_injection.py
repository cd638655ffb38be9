"""Fault injection: runs killed with SIGKILL at chosen moments resume to exactly the uninterrupted result.

An SFT, a DPO and a GRPO run are killed (as by ``kill -9``: no cleanup) right after an optimizer
step, inside a checkpoint write (after any one of its files is flushed into the temporary
directory) or right after a checkpoint's rename (before older ones are pruned); some are killed a
second time while resuming. Each is then resumed with ``--resume`` and must end with:
  - ``OUTPUT/model.safetensors`` equal to an uninterrupted run's, every tensor bit for bit;
  - ``OUTPUT/metrics.jsonl`` (and GRPO's ``samples.jsonl``) holding each logged step exactly once,
    with the uninterrupted run's values (throughput aside);
  - no checkpoint debris left.
After every kill the checkpoints on disk must be what the moment implies: a kill inside a write
leaves only that checkpoint's ``.tmp-`` directory, holding exactly the files written so far, and
no ``step-`` directory of that step; each resume must continue from the newest complete
checkpoint (or from the beginning) and remove the debris before anything else.

The moments are reached deterministically with ``POSTTRAIN_DIE_AT`` (``posttrain.training.faults``).
Every run is a process of its own, forked from a ``multiprocessing`` fork server that has imported
posttrain once (and computed nothing), so a run costs its training only, not a fresh import of
torch and transformers; it exits or dies exactly as ``python -m posttrain`` would. The uninterrupted
SFT run is a new ``python -m posttrain`` process, so the forked SFT runs are checked against one.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, preference_rows, qa_rows, write_jsonl
from posttrain.training.faults import VARIABLE

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# the files of a checkpoint, in the order they are written (one process: rank 0 only)
CHECKPOINT_FILES = [
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng-0.safetensors",
    "rng-0.json",
    "trainer_state.json",
]
RULES = """
def vowel_fraction(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
"""
RUN_TIMEOUT_S = 300


def run_cli(argv: list[str], log: str, die_at: str | None) -> None:
    """The body of one run's process: ``python -m posttrain ARGV``, output to LOG, killed at DIE_AT."""
    os.environ.update(OFFLINE)
    os.environ.pop(VARIABLE, None)
    if die_at is not None:
        os.environ[VARIABLE] = die_at
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from posttrain.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def processes():
    """A fork server that imported posttrain with the offline environment; each run forks from it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["posttrain.cli", __name__])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)  # read at import time by huggingface_hub, so set in the server
        patch.delenv(VARIABLE, raising=False)
        multiprocessing.forkserver.ensure_running()
    return context


@dataclass
class Run:
    code: int
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Stage:
    """One stage's command line (all but --output and --resume), its step count and checkpoint interval."""

    argv: list[str]
    total_steps: int
    save_steps: int
    processes: object
    logs: Path
    samples: bool = False  # GRPO: samples.jsonl must match too
    reference: Path | None = None  # OUTPUT of the uninterrupted run

    def run(self, output: Path, resume: bool, die_at: str | None = None, fresh: bool = False) -> Run:
        """One run, forked from the fork server, or with FRESH a new ``python -m posttrain`` process."""
        log = self.logs / f"{output.name}-{len(list(self.logs.glob(output.name + '-*')))}.log"
        argv = [*self.argv, "--output", str(output), *(["--resume"] if resume else [])]
        if fresh:
            env = {k: v for k, v in os.environ.items() if k != VARIABLE} | OFFLINE
            env |= {VARIABLE: die_at} if die_at is not None else {}
            with log.open("w") as file:
                command = [sys.executable, "-m", "posttrain", *argv]
                done = subprocess.run(command, env=env, stdout=file, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
            return Run(done.returncode, log)
        process = self.processes.Process(target=run_cli, args=(argv, str(log), die_at))
        process.start()
        process.join(RUN_TIMEOUT_S)
        if process.exitcode is None:
            process.kill()
            process.join()
            pytest.fail(
                f"{' '.join(argv)} (dying at {die_at}) did not finish in {RUN_TIMEOUT_S}s:\n{Run(0, log).tail()}"
            )
        return Run(process.exitcode, log)


def make_stage(tmp_path_factory, processes, name: str, argv: list[str], total: int, save: int, **kw) -> Stage:
    """The stage, with its uninterrupted run done."""
    fresh = kw.pop("fresh", False)
    root = tmp_path_factory.mktemp(f"faults-{name}")
    (root / "logs").mkdir()
    stage = Stage([name, *argv], total, save, processes, root / "logs", **kw)
    reference = stage.run(root / "uninterrupted", resume=False, fresh=fresh)
    assert reference.code == 0, reference.tail()
    stage.reference = root / "uninterrupted"
    return stage


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model, processes) -> Stage:
    data = write_jsonl(tmp_path_factory.mktemp("sft-data") / "qa.jsonl", qa_rows(64))
    argv = ["--model", str(tiny_model), "--data", str(data), "--batch-size", "4", "--max-steps", "8",
            "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3", "--seed", "7"]  # fmt: skip
    # a new interpreter: every forked SFT run must then also match a run of `python -m posttrain` itself
    return make_stage(tmp_path_factory, processes, "sft", argv, total=8, save=2, fresh=True)


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, tiny_model, processes) -> Stage:
    data = write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", preference_rows(32))
    argv = ["--model", str(tiny_model), "--data", str(data), "--batch-size", "4", "--max-steps", "6",
            "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3", "--seed", "3"]  # fmt: skip
    return make_stage(tmp_path_factory, processes, "dpo", argv, total=6, save=2)


@pytest.fixture(scope="module")
def grpo(tmp_path_factory, tiny_model, processes) -> Stage:
    files = tmp_path_factory.mktemp("grpo-data")
    (files / "rules.py").write_text(RULES)
    prompts = write_jsonl(files / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS] * 4)
    argv = ["--model", str(tiny_model), "--prompts", str(prompts), "--reward", f"{files / 'rules.py'}:vowel_fraction",
            "--rollout-prompts", "4", "--num-generations", "2", "--batch-size", "4", "--max-new-tokens", "8",
            "--temperature", "1.0", "--missing-eos-penalty", "0", "--learning-rate", "1e-2", "--max-steps", "4",
            "--save-steps", "1", "--sample-steps", "1", "--seed", "7"]  # fmt: skip
    return make_stage(tmp_path_factory, processes, "grpo", argv, total=4, save=1, samples=True)


def parse_moment(moment: str) -> tuple[int, str | None]:
    """(step, checkpoint file or "renamed") of ``step/N`` or ``checkpoint/N/WHAT``; None for a step."""
    kind, step, *what = moment.split("/")
    assert (kind, len(what)) in (("step", 0), ("checkpoint", 1)), moment
    return int(step), (what[0] if what else None)


def complete_after(stage: Stage, moment: str) -> int:
    """The newest checkpoint complete once the run died at MOMENT (0: none); logging precedes the checkpoint."""
    step, what = parse_moment(moment)
    saved = [s for s in range(stage.save_steps, stage.total_steps, stage.save_steps) if s < step]
    saved += [step] if what == "renamed" else []
    return max(saved, default=0)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steady(record: dict) -> dict:
    return {k: v for k, v in record.items() if "per_second" not in k}


def check_killed(stage: Stage, output: Path, moment: str, run: Run) -> None:
    """The run died at MOMENT, leaving no final model and exactly the checkpoints the moment implies."""
    assert run.code == -signal.SIGKILL, (
        f"{stage.argv[0]}: the moment {moment} was not reached: exit {run.code}\n{run.tail()}"
    )
    assert not (output / "model.safetensors").exists()
    step, what = parse_moment(moment)
    checkpoints = output / "checkpoints"
    tmp = sorted(p.name for p in checkpoints.glob(".tmp-*"))
    name = f"step-{step:08d}"
    if what is None or what == "renamed":
        assert tmp == [], f"checkpoint debris after dying at {moment}: {tmp}"
    else:  # inside the write: only this checkpoint's temporary directory, with the files written so far
        assert tmp == [f".tmp-{name}"], tmp
        written = CHECKPOINT_FILES[: CHECKPOINT_FILES.index(what) + 1]
        assert sorted(p.name for p in (checkpoints / tmp[0]).iterdir()) == sorted(written)
        assert not (checkpoints / name).exists()
    newest = complete_after(stage, moment)
    complete = sorted(p.name for p in checkpoints.glob("step-*") if (p / "trainer_state.json").is_file())
    assert (complete[-1] if complete else None) == (f"step-{newest:08d}" if newest else None), complete
    if what == "renamed":
        assert sorted((checkpoints / name).iterdir()) == sorted(checkpoints / name / f for f in CHECKPOINT_FILES)
    logged = step - 1 if what is None else step  # a step is logged before its checkpoint is written
    assert [r["step"] for r in records(output / "metrics.jsonl")] == list(range(1, logged + 1))


def check_resumed_from(run: Run, step: int) -> None:
    log = run.log.read_text(errors="replace")
    if step == 0:
        assert "no complete checkpoint" in log and "starting from the beginning" in log, run.tail()
    else:
        assert re.findall(r"--resume: continuing from step (\d+)", log) == [str(step)], run.tail()


def check_same_as_uninterrupted(stage: Stage, output: Path) -> None:
    full, again = load_file(stage.reference / "model.safetensors"), load_file(output / "model.safetensors")
    assert full.keys() == again.keys()
    differ = {
        name: (full[name] - again[name]).abs().max().item() for name in full if not torch.equal(full[name], again[name])
    }
    assert not differ, f"{stage.argv[0]}: tensors differ from the uninterrupted run (max abs difference): {differ}"
    steps = [r["step"] for r in records(output / "metrics.jsonl")]
    assert steps == list(range(1, stage.total_steps + 1)), steps  # each logged step exactly once
    assert [steady(r) for r in records(output / "metrics.jsonl")] == [
        steady(r) for r in records(stage.reference / "metrics.jsonl")
    ]
    if stage.samples:
        assert (output / "samples.jsonl").read_text() == (stage.reference / "samples.jsonl").read_text()
    assert not list((output / "checkpoints").glob(".tmp-*"))


def kill_and_resume(stage: Stage, output: Path, moments: tuple[str, ...]) -> None:
    """Die at each moment in turn (the first run new, the next ones resuming), then resume to the end."""
    resume_from = None
    for moment in moments:
        run = stage.run(output, resume=resume_from is not None, die_at=moment)
        if resume_from is not None:
            check_resumed_from(run, resume_from)
        check_killed(stage, output, moment, run)
        resume_from = complete_after(stage, moment)
    final = stage.run(output, resume=True)
    assert final.code == 0, final.tail()
    check_resumed_from(final, resume_from)
    check_same_as_uninterrupted(stage, output)


def label(moments: tuple[str, ...]) -> str:
    return " then ".join(moments)


@pytest.mark.parametrize(
    "moments",
    [
        ("step/1",),  # before any checkpoint: the resume starts from the beginning
        ("checkpoint/2/model.safetensors",),  # inside the first checkpoint: none complete yet
        ("checkpoint/4/trainer_state.json", "checkpoint/4/renamed"),  # every file written, not renamed
        ("checkpoint/4/renamed",),
        ("step/5", "checkpoint/6/rng-0.safetensors"),
        ("checkpoint/6/renamed", "step/8"),  # three complete checkpoints (not pruned yet); the last step
    ],
    ids=label,
)
def test_sft_killed_and_resumed_is_bit_identical(sft, tmp_path, moments):
    kill_and_resume(sft, tmp_path / "out", moments)


@pytest.mark.parametrize(
    "moments",
    [("checkpoint/2/rng-0.json",), ("step/3", "checkpoint/4/scheduler.json"), ("checkpoint/4/renamed",)],
    ids=label,
)
def test_dpo_killed_and_resumed_is_bit_identical(dpo, tmp_path, moments):
    kill_and_resume(dpo, tmp_path / "out", moments)


@pytest.mark.parametrize(
    "moments",
    [("step/1",), ("checkpoint/2/optimizer.safetensors",), ("step/3", "checkpoint/3/trainer_state.json")],
    ids=label,
)
def test_grpo_killed_and_resumed_is_bit_identical(grpo, tmp_path, moments):
    kill_and_resume(grpo, tmp_path / "out", moments)


def test_a_kill_inside_a_checkpoint_write_leaves_it_incomplete_and_the_resume_removes_it(sft, tmp_path):
    output, checkpoints = tmp_path / "out", tmp_path / "out" / "checkpoints"
    killed = sft.run(output, resume=False, die_at="checkpoint/4/optimizer.json")
    assert killed.code == -signal.SIGKILL, killed.tail()
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-00000004", "step-00000002"]
    assert sorted(p.name for p in (checkpoints / ".tmp-step-00000004").iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
    ]
    # killed again at step 3, before it writes the step-4 checkpoint anew: the resume itself removed the debris
    again = sft.run(output, resume=True, die_at="step/3")
    assert again.code == -signal.SIGKILL, again.tail()
    check_resumed_from(again, 2)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    final = sft.run(output, resume=True)
    assert final.code == 0, final.tail()
    check_resumed_from(final, 2)
    check_same_as_uninterrupted(sft, output)
