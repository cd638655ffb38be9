"""Resumable checkpoints in safetensors + JSON (no pickled tensors), written atomically.

A checkpoint ``OUTPUT/checkpoints/step-00000050/`` holds:
  model.safetensors          the trainable parameters (all of them, or only LoRA adapters)
  optimizer.safetensors/json AdamW moments and step counts / parameter groups
  scheduler.json             the learning-rate scheduler's state
  rng-<rank>.safetensors/json torch, numpy and Python RNG states of each process
  trainer_state.json         step and data position, written last
It is written to ``.tmp-step-...`` and renamed into place, so a run killed mid-write
leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from posttrain.errors import UserError

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never match the prefix)."""
    done = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; tied weights appear once (``named_parameters`` dedups them)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    flat = {**load_file(directory / "optimizer.safetensors"), **meta["scalars"]}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_rng(directory: Path, rank: int) -> None:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():  # sampling on GPUs draws from their generators
        tensors |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, directory / f"rng-{rank}.safetensors")
    meta = {"python": random.getstate(), "numpy": [kind, pos, has_gauss, gauss]}
    (directory / f"rng-{rank}.json").write_text(json.dumps(meta))


def _load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(directory / f"rng-{rank}.safetensors")
    meta = json.loads((directory / f"rng-{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint for ``trainer_state['step']`` atomically; prune to the newest ``keep``."""
    final = directory / checkpoint_name(trainer_state["step"])
    tmp = directory / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a run killed while writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), tmp / "model.safetensors")
        _save_optimizer(optimizer, tmp)
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote (before ``accelerator.prepare``); returns trainer state."""
    weights = load_file(path / "model.safetensors")
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {extra})")
    model.load_state_dict(weights, strict=False)
    _load_optimizer(optimizer, path)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if not (path / f"rng-{rank}.json").is_file():
        raise UserError(
            f"{path}: no RNG state for process {rank}; resume with the number of processes it was written with"
        )
    _load_rng(path, rank)
    return json.loads((path / "trainer_state.json").read_text())
