"""``OUTPUT/metrics.jsonl``: one JSON object per logged step; optionally mirrored to a tracker."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm.auto import tqdm

from posttrain.errors import UserError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def tracker_for(report_to: str) -> str | None:
    """The accelerate tracker name for ``--report-to``; its package must be installed."""
    if report_to == "none":
        return None
    if importlib.util.find_spec(TRACKER_PACKAGES[report_to]) is None:
        raise UserError(f"--report-to {report_to}: the '{TRACKER_PACKAGES[report_to]}' package is not installed")
    return report_to


def truncate_after(path: Path, step: int) -> None:
    """On resume, forget records past the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """Appends records to metrics.jsonl on the main process and forwards them to trackers."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


@contextlib.contextmanager
def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Iterator[tqdm]:
    """posttrain's progress bar: shown after its first second (a run that fails at once prints only
    its error), and erased when the run stops with an error, so the error line stands alone."""
    bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, delay=1.0)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
