"""Kill -9 of ``posttrain annotate serve`` under load from 20 annotators: after a restart the database holds
every label confirmed to a client and nothing that was never posted, and every queue serves again.

Runs the load script of ``bench/`` (its checks, not its timings): it exits 1 when a check fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "annotate_load.py"


@pytest.mark.slow
def test_sigkill_mid_load_loses_and_invents_nothing():
    done = subprocess.run([sys.executable, str(BENCH), "--annotators", "20", "--pairs", "3000", "--seconds", "12",
                           "--kill-after", "5"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [json.loads(line.split(": ", 1)[1]) for line in done.stdout.splitlines() if "database check" in line]
    assert len(checks) == 2  # after the kill, and after the restart and more labels
    killed, resumed = checks
    assert killed["confirmed"] > 0 and killed["confirmed_missing"] == killed["never_posted"] == 0
    assert killed["stored"] - killed["confirmed"] <= 20  # at most each client's one request in flight
    assert resumed["confirmed"] > killed["confirmed"]  # the restarted server served every queue again
    assert resumed["repeated"] == resumed["over_overlap"] == 0
    assert "SIGKILL" in done.stdout and "client errors: 20" in done.stdout  # the kill cut every client off mid-load
