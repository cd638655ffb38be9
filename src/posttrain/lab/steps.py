"""The lab's steps: each runs once, records itself in ``OUTPUT/<step>/step.json``, and logs the
time the whole lab has left before it starts."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEP_FILE = "step.json"
STEPS = ("data", "base", "sft", "preferences", "rm", "ppo", "dpo", "evaluate")

# Seconds each step took on 2 CPU cores (bench/lab_times.py); only the time-left estimate uses them.
EXPECTED_SECONDS = {
    "quick": {"data": 1, "base": 105, "sft": 22, "preferences": 6, "rm": 37, "ppo": 47, "dpo": 15, "evaluate": 4},
    "smoke": dict.fromkeys(STEPS, 1),
    "full": {"data": 1, "base": 425, "sft": 38, "preferences": 16, "rm": 98, "ppo": 174, "dpo": 37, "evaluate": 8},
}


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


def step(name: str, directory: Path, run, progress: Progress) -> dict[str, Any]:
    """Run one step unless ``directory/step.json`` says it finished; returns what the step recorded.

    Logs "lab: step i/8 NAME (about T left)" first; the stage's own bar then shows its progress."""
    marker = directory / name / STEP_FILE
    if marker.is_file():
        log.info("lab: %s already done (%s)", name, marker.parent)
        return json.loads(marker.read_text())
    remaining = [s for s in STEPS[STEPS.index(name) :] if not (directory / s / STEP_FILE).is_file()]
    left = clock(progress.seconds_left(remaining))
    log.info("lab: step %d/%d %s (about %s left for the whole lab)", STEPS.index(name) + 1, len(STEPS), name, left)
    start = time.perf_counter()
    record = run(directory / name) or {}
    record["seconds"] = round(time.perf_counter() - start, 1)
    progress.ran[name] = record["seconds"]
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2))
    log.info("lab: %s done in %s", name, clock(record["seconds"]))
    return record
