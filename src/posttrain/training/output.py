"""A run's OUTPUT directory: claimed by one writer, never lost to ``--overwrite``.

``claim_output`` runs before a stage loads anything heavy and before OUTPUT changes:
  1. OUTPUT may not be, contain, or lie inside any input of the run (a model, data, reward,
     config file): ``--output M --overwrite`` with ``--model M`` would delete the model;
  2. an exclusive OS lock (``flock`` on ``.NAME.lock`` beside OUTPUT) for the life of the
     process: a second run on the same OUTPUT refuses at once, naming the process that holds
     it; a killed run's lock dies with it (the kernel releases it), so no lock goes stale;
  3. the state checks: a non-empty OUTPUT needs ``--resume`` or ``--overwrite``; ``--resume``
     needs OUTPUT to be a posttrain run (its ``config.yaml``) or to be empty.
With ``--overwrite`` over a non-empty OUTPUT the run writes into ``.NAME.new`` beside it, and
``Claim.commit`` swaps it in once the run has finished, so a run that fails leaves the
previous results exactly as they were. A swap cut short by a kill is completed (or undone)
by the next claim, under the lock. Only the main process locks and writes; the others get
its verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from posttrain import config as config_io
from posttrain.errors import UserError
from posttrain.rewards import spec_paths
from posttrain.training.checkpoint import latest_checkpoint

# Fields of a stage config that name inputs (files or directories); ``reward`` and ``gold_reward`` are specs.
INPUT_FIELDS = ("model", "ref", "data", "eval_data", "prompts", "eval_prompts")


def run_inputs(config) -> list[tuple[str, str]]:
    """(option, path) of every input a stage config names (model, data, reward, ...)."""
    fields = {f.name for f in dataclasses.fields(config)}
    named = [(config_io.flag(n), getattr(config, n)) for n in INPUT_FIELDS if n in fields and getattr(config, n)]
    for name in ("reward", "gold_reward"):
        if name in fields and getattr(config, name):
            named += [(config_io.flag(name), path) for path in spec_paths(getattr(config, name))]
    return named


def check_not_an_input(output: str, inputs: list[tuple[str, str]]) -> None:
    """OUTPUT may not be, contain, or lie inside an existing input: --overwrite (or a swap) would destroy it."""
    target = Path(output).expanduser().resolve()
    for option, value in inputs:
        path = Path(value).expanduser()
        if not path.exists():
            continue  # a hub id, or a module name
        path = path.resolve()
        if target == path or target in path.parents:
            raise UserError(f"--output {output}: holds {option} {value}; write the run somewhere else")
        if path.is_dir() and path in target.parents:
            raise UserError(f"--output {output}: lies inside {option} {value}; write the run somewhere else")


def check_report_dir(output: str, inputs: list[tuple[str, str]], overwrite: bool) -> Path:
    """An instrument's --output directory: not one of its inputs, not a file, and empty unless --overwrite."""
    check_not_an_input(output, inputs)
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {output}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"--output {output}: directory is not empty; pass --overwrite to replace it")
    return path


def sibling(output: Path, suffix: str) -> Path:
    """A hidden path beside OUTPUT: ``runs/.sft.lock`` for ``runs/sft``."""
    return output.parent / f".{output.name}.{suffix}"


class Lock:
    """``flock`` on ``.NAME.lock`` beside OUTPUT, held until ``release`` or the process ends."""

    def __init__(self, output: Path, shown: str) -> None:
        self.path = sibling(output, "lock")
        output.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"--output {shown}: another run is writing to it (process {holder})") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break  # else a run that finished unlinked the file between our open and flock: take the new one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # while still held: the next run re-checks the inode
        os.close(self.fd)


def recover(output: Path) -> None:
    """Finish or undo a swap that a kill cut short; drop the debris of a killed --overwrite run."""
    new, old = sibling(output, "new"), sibling(output, "old")
    if old.exists():
        if not output.exists() and new.exists():  # killed between the two renames: the new run had finished
            new.rename(output)
        if output.exists():
            shutil.rmtree(old)
    if new.exists():
        shutil.rmtree(new)


def is_empty(output: Path) -> bool:
    return not output.exists() or (output.is_dir() and not any(output.iterdir()))


def state_problem(output: Path, shown: str, resume: bool, overwrite: bool) -> str | None:
    """Why this OUTPUT cannot take the run, or None."""
    if output.exists() and not output.is_dir():
        return f"--output {shown}: exists and is not a directory"
    if is_empty(output):
        return None
    if resume and not (output / "config.yaml").is_file():
        return f"--resume: {shown} is not a posttrain run (no config.yaml); not touching it"
    if not (resume or overwrite):
        return f"--output {shown}: directory is not empty; pass --overwrite to replace it or --resume"
    return None


@dataclass
class Claim:
    """OUTPUT as this run holds it: ``final`` is what the user named, ``work`` where the run writes."""

    final: Path
    work: Path
    lock: Lock | None  # None on processes other than the main one

    @property
    def staged(self) -> bool:
        return self.work != self.final

    def commit(self, accelerator: Accelerator) -> None:
        """Make the finished run OUTPUT: swap the staged directory in (old results go only now)."""
        accelerator.wait_for_everyone()
        if self.lock is not None and self.staged:
            old = sibling(self.final, "old")
            self.final.rename(old)
            self.work.rename(self.final)
            shutil.rmtree(old)
            self.work = self.final
        accelerator.wait_for_everyone()


def _claim_on_main(config, shown: str) -> tuple[Lock, Path, str]:
    """Lock, finish any cut-short swap, check; returns (lock, directory to write, OUTPUT's state: absent,
    empty or full)."""
    output = Path(config.output).expanduser().absolute()
    if not output.name:
        raise UserError(f"--output {shown}: name a directory")
    lock = Lock(output, shown)
    try:
        recover(output)
        problem = state_problem(output, shown, config.resume, config.overwrite)
        if problem:
            raise UserError(problem)
    except BaseException:
        lock.release()
        raise
    if not is_empty(output):
        return lock, sibling(output, "new") if config.overwrite else output, "full"
    return lock, output, "empty" if output.exists() else "absent"


@contextlib.contextmanager
def claim_output(config, accelerator: Accelerator) -> Iterator[Claim]:
    """Check, lock and (for --overwrite) stage OUTPUT for the ``with`` block; see the module docstring.

    On an error inside the block a staged directory is removed (the previous OUTPUT stays as it
    was); the lock is released on leaving the block either way.
    """
    shown = config.output
    check_not_an_input(config.output, run_inputs(config))
    verdict: list = [None]
    lock, before = None, "full"
    if accelerator.is_main_process:
        try:
            lock, work, before = _claim_on_main(config, shown)
            verdict = [str(work)]
        except UserError as err:
            verdict = [err]
    broadcast_object_list(verdict)
    if isinstance(verdict[0], UserError):
        raise verdict[0]
    claim = Claim(Path(config.output).expanduser().absolute(), Path(verdict[0]), lock)
    try:
        yield claim
    except BaseException as err:
        if lock is not None:
            clean_up_failed(claim, before, isinstance(err, UserError))
        raise
    finally:
        if lock is not None:
            lock.release()


def clean_up_failed(claim: Claim, before: str, user_error: bool) -> None:
    """After a failed run: drop a staged directory (the earlier OUTPUT stays as it was), and the
    files of a run that a user error stopped before its first checkpoint in an OUTPUT that was
    empty, so the corrected command runs without --overwrite. A run with a checkpoint stays
    resumable; a bug keeps its files to look at."""
    if claim.staged:
        if claim.work.exists():
            shutil.rmtree(claim.work)
    elif before != "full" and user_error and latest_checkpoint(claim.work / "checkpoints") is None:
        if claim.work.exists():
            shutil.rmtree(claim.work)
        if before == "empty":
            claim.work.mkdir()


def open_output(config, accelerator: Accelerator, directory: Path, trackers: bool = True) -> None:
    """Create the directory the run writes to, save the resolved config there, start trackers.

    Called once every check that can refuse the run has passed, so a refused run changes nothing.
    """
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        config_io.save(config, directory / "config.yaml")
    accelerator.wait_for_everyone()
    if trackers:  # a reward ensemble's directory has none: each member starts its own
        accelerator.init_trackers(Path(config.output).name, config=dataclasses.asdict(config))
