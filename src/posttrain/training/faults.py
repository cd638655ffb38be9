"""Deterministic fault injection for the kill-and-resume tests (inert unless the variable is set).

``POSTTRAIN_DIE_AT=checkpoint/4/optimizer.safetensors`` makes the process kill itself with
SIGKILL (as ``kill -9`` would, with no cleanup) right after that moment: after a named file of
the step-4 checkpoint is flushed, after its rename (``checkpoint/4/renamed``), or after an
optimizer step (``step/3``). Tests use it to reach a moment inside a checkpoint write exactly.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "POSTTRAIN_DIE_AT"


def maybe_die(moment: str) -> None:
    if os.environ.get(VARIABLE) == moment:
        os.kill(os.getpid(), signal.SIGKILL)
