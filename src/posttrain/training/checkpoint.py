"""Resumable checkpoints in safetensors + JSON (no pickled tensors), written atomically.

A checkpoint ``OUTPUT/checkpoints/step-00000050/`` holds:
  model.safetensors          the trainable parameters (all of them, or only LoRA adapters)
  optimizer.safetensors/json AdamW moments and step counts / parameter groups
  scheduler.json             the learning-rate scheduler's state
  rng-<rank>.safetensors/json torch, numpy and Python RNG states of each process
  trainer_state.json         step and data position, written last
It is written to ``.tmp-step-...``, every file and the directory are flushed to disk (fsync),
and only then renamed into place: a checkpoint is complete exactly when its name has the
``step-`` prefix, so a run killed (or a machine that lost power) mid-write leaves the previous
checkpoint as the newest complete one. Only the main process writes (the RNG states of the
other processes are gathered to it). Nothing non-finite is ever written: a NaN in the weights
or the optimizer state is a bug that stops the run. ``faults.maybe_die`` marks the moments a
fault-injection test kills the process at.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain.errors import UserError
from posttrain.training.faults import maybe_die

log = logging.getLogger(__name__)

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match the prefix)."""
    return sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file())


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint."""
    done = complete_checkpoints(directory)
    return done[-1] if done else None


def remove_debris(directory: Path) -> None:
    """Temporary directories of checkpoints whose writing a kill cut short."""
    for tmp in directory.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; tied weights appear once (``named_parameters`` dedups them)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state as (tensors for safetensors, JSON: parameter groups and scalar entries)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``optimizer_files``: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in {**tensors, **meta["scalars"]}.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and Python RNG states, as plain picklable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():  # sampling on GPUs draws from their generators
        tensors |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    return {"tensors": tensors, "meta": {"python": random.getstate(), "numpy": [kind, pos, has_gauss, gauss]}}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def check_finite(tensors: dict[str, torch.Tensor], what: str, step: int, directory: Path) -> None:
    """Refuse to write a checkpoint holding NaN or infinity (an update overflowed, usually a learning rate too high)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(
            f"the {what} hold NaN or infinity after step {step} ({len(bad)} tensors, e.g. {bad[0]}); not writing a "
            f"checkpoint (lower --learning-rate?). Last good checkpoint: {latest_checkpoint(directory) or 'none'}"
        )


def write_files(tmp: Path, files: dict[str, Any], step: int) -> None:
    """Write each file (tensors: safetensors; anything else: JSON) and flush it; ``trainer_state.json`` last."""
    for name, content in files.items():
        path = tmp / name
        if name.endswith(".safetensors"):
            save_file(content, path)
        else:
            path.write_text(json.dumps(content, indent=2 if name == "trainer_state.json" else None))
        fsync_path(path)
        maybe_die(f"checkpoint/{step}/{name}")
    fsync_path(tmp)


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint for ``trainer_state['step']`` atomically and durably; prune to the newest ``keep``."""
    step = trainer_state["step"]
    final = directory / checkpoint_name(step)
    rngs = gather_object([rng_state()])  # every process's, in rank order
    if accelerator.is_main_process:
        weights = trainable_state(accelerator.unwrap_model(model))
        moments, optimizer_meta = optimizer_files(optimizer)
        check_finite(weights, "weights", step, directory)
        check_finite(moments, "optimizer moments", step, directory)
        files = {"model.safetensors": weights, "optimizer.safetensors": moments, "optimizer.json": optimizer_meta,
                 "scheduler.json": scheduler.state_dict()}  # fmt: skip
        for rank, rng in enumerate(rngs):
            files |= {f"rng-{rank}.safetensors": rng["tensors"], f"rng-{rank}.json": rng["meta"]}
        tmp = directory / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a run killed while writing
        tmp.mkdir(parents=True)
        write_files(tmp, files | {"trainer_state.json": trainer_state}, step)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_path(directory)
        maybe_die(f"checkpoint/{step}/renamed")
        for old in complete_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Every file of a checkpoint, read and parsed (nothing applied yet); raises ``UnreadableCheckpoint``."""
    if not (path / f"rng-{rank}.json").is_file():
        raise UserError(
            f"{path}: no RNG state for process {rank}; resume with the number of processes it was written with"
        )
    try:
        return {
            "weights": load_file(path / "model.safetensors"),
            "optimizer": optimizer_state(
                load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
            ),
            "scheduler": json.loads((path / "scheduler.json").read_text()),
            "rng": (load_file(path / f"rng-{rank}.safetensors"), json.loads((path / f"rng-{rank}.json").read_text())),
            "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        }
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise UnreadableCheckpoint(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


class UnreadableCheckpoint(Exception):
    """A checkpoint with a missing, truncated or corrupt file (resume falls back to an older one)."""


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote (before ``accelerator.prepare``); returns trainer state.

    The files are read and checked in full before anything is applied, so an unreadable
    checkpoint leaves the model and optimizer untouched.
    """
    content = read_checkpoint(path, rank)
    weights, expected = content["weights"], set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {extra})")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(content["optimizer"])
    scheduler.load_state_dict(content["scheduler"])
    restore_rng(*content["rng"])
    return content["trainer_state"]


def load_newest_readable(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> dict[str, Any] | None:
    """Load the newest complete checkpoint that can be read, saying which ones could not; None if none."""
    for path in reversed(complete_checkpoints(directory)):
        try:
            return load_checkpoint(path, model, optimizer, scheduler, rank)
        except UnreadableCheckpoint as err:
            log.warning("--resume: %s; trying the one before it", err)
    return None
