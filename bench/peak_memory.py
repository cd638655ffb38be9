"""Run a Python module or script in this process and write its peak resident memory (MiB) on exit.

The peak is /proc/self/status VmHWM, the high-water mark of this process's own memory: unlike
``ru_maxrss`` of a child, it does not inherit the launching process's footprint. Linux only.

    python bench/peak_memory.py OUT.txt -m posttrain sft ...
    python bench/peak_memory.py OUT.txt script.py ...
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise SystemExit("no VmHWM in /proc/self/status")


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    atexit.register(lambda: out.write_text(f"{peak_mib():.1f}"))
    if rest[0] == "-m":
        sys.argv = rest[1:]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, str(Path(rest[0]).resolve().parent))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
