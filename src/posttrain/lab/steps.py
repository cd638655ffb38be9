"""The lab's steps as one declared list, and how a run goes through it.

Each ``Step`` names its function, the steps whose outputs it reads and the seconds it usually takes.
From that list come the order of a run, the time-left estimate logged before each step, and which
steps ``--reuse`` may copy from another run (those that read no annotator's label, directly or
through what they need). A step runs once: it writes ``OUTPUT/<step>/`` and marks itself done
with ``step.json`` last, so a finished step is skipped and an interrupted run resumes at the step
it stopped in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.lab import world
from posttrain.lab.presets import Preset

log = logging.getLogger(__name__)

STEP_FILE = "step.json"


@dataclass(frozen=True)
class Lab:
    """The world of a run and every question asked about it in training."""

    world: world.World
    questions: list[world.Question]

    def by_text(self) -> dict[str, world.Question]:
        return {q.text: q for q in self.questions}


def make_lab(preset: Preset, seed: int) -> Lab:
    """The world a preset and seed describe, and every question about it."""
    the_world = world.make_world(seed, preset.n_towns, preset.unknowable_share, preset.unseen_share,
                                 evaluation_towns=preset.eval_towns)  # fmt: skip
    return Lab(the_world, world.questions(the_world, seed, n_arithmetic=preset.n_arithmetic))


@dataclass(frozen=True)
class Run:
    """What a step needs to know: where the run writes, its settings, and where the outputs of steps
    done elsewhere lie (an experiment's arms read the shared steps from its trunk)."""

    out: Path
    preset: Preset
    seed: int
    annotators: str
    lab: Lab
    sources: Mapping[str, Path] = field(default_factory=dict)  # step -> its directory in another run
    evaluated: tuple[str, ...] = ("base", "sft", "ppo", "dpo")  # the models the evaluate step answers with

    def path(self, step: str) -> Path:
        return self.sources.get(step, self.out / step)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Run, Path], dict[str, Any] | None]  # (the run, this step's directory) -> what step.json records
    needs: tuple[str, ...]  # steps whose outputs it reads
    seconds: float  # on the quick preset, alone on a 2-core AVX2 host (bench/lab_times.py): only the estimate uses it
    reads_labels: bool = False  # reads the annotator pool (so it differs between pools)


def depends_on_labels(steps: list[Step], name: str) -> bool:
    """Whether the step ``name`` reads the annotators' labels, itself or through what it needs."""
    by_name = {s.name: s for s in steps}
    todo, seen = [name], set()
    while todo:
        current = by_name[todo.pop()]
        if current.reads_labels:
            return True
        seen.add(current.name)
        todo += [n for n in current.needs if n not in seen]
    return False


def shared_steps(steps: list[Step]) -> tuple[str, ...]:
    """The steps that are the same for every annotator pool, given the preset and seed."""
    return tuple(s.name for s in steps if not depends_on_labels(steps, s.name))


@dataclass
class Progress:
    """What the lab has left to do, for the log line before each step."""

    expected: dict[str, float]  # step -> seconds it usually takes
    ran: dict[str, float] = field(default_factory=dict)  # step -> seconds it took in this process

    prior: float = 30.0  # seconds of "as expected" mixed into the speed, so one short step cannot swing it

    def seconds_left(self, remaining: list[str]) -> float:
        """Expected seconds of ``remaining`` steps, times this machine's speed on the steps run so far:
        (Σ actual + prior) / (Σ expected + prior), 1 before any step ran."""
        done = sum(self.expected[name] for name in self.ran)
        speed = (sum(self.ran.values()) + self.prior) / (done + self.prior) if done + self.prior else 1.0
        return speed * sum(self.expected[name] for name in remaining)


def clock(seconds: float) -> str:
    """Seconds as "1 min 05 s" or "42 s"."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def record(directory: Path) -> dict[str, Any]:
    """What a finished step recorded (its step.json)."""
    return json.loads((directory / STEP_FILE).read_text())


def run_steps(run: Run, steps: list[Step], progress: Progress, label: str = "lab") -> dict[str, dict[str, Any]]:
    """Run ``steps`` in order, skipping those in ``run.sources`` and those already done; returns each
    step's record. Logs "LABEL: step i/n NAME (about T left)" before each; the stage's own bar then
    shows its progress."""
    own = [s for s in steps if s.name not in run.sources]
    records = {}
    for i, current in enumerate(own):
        directory = run.path(current.name)
        if (directory / STEP_FILE).is_file():
            log.info("%s: %s already done (%s)", label, current.name, directory)
            records[current.name] = record(directory)
            continue
        remaining = [s.name for s in own[i:] if not (run.path(s.name) / STEP_FILE).is_file()]
        left = clock(progress.seconds_left(remaining))
        log.info("%s: step %d/%d %s (about %s left)", label, i + 1, len(own), current.name, left)
        start = time.perf_counter()
        result = current.run(run, directory) or {}
        result["seconds"] = round(time.perf_counter() - start, 1)
        progress.ran[current.name] = result["seconds"]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STEP_FILE).write_text(json.dumps(result, indent=2))
        log.info("%s: %s done in %s", label, current.name, clock(result["seconds"]))
        records[current.name] = result
    return records
