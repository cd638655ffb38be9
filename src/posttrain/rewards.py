"""Rewards as one interface: ``reward(prompts, completions) -> scores``.

A reward spec (``--reward``) is one of, or a weighted sum (``+``) of:
  DIR                  a reward-model directory (``posttrain rm`` output), scores normalised
                       with the mean/std stored beside it
  DIR with ensemble.json  a reward ensemble, aggregated by ``--ensemble-aggregate``
  module:function      a Python function (rule-based reward): ``f(prompts, completions) -> floats``;
  path/to/file.py:function  the same, from a file
  0.5*SPEC             a weight
e.g. ``--reward "runs/rm + 0.5*rules.py:ends_politely"``.

Prompts are passed as they are in the data (strings or message lists), completions as
decoded strings. A reward model with another tokenizer than the policy's re-tokenizes the
text itself, so any policy can be scored by any reward model.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import reprlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from posttrain.data.collate import pad_batch
from posttrain.data.preference import prompt_and_answer
from posttrain.errors import UserCodeError, UserError
from posttrain.models import reward_model as rm

Reward = Callable[[Sequence[Any], Sequence[str]], torch.Tensor]  # -> (N,) float32


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, for a one-line report of someone else's exception."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_module(module_name: str) -> ModuleType:
    """Import ``module_name`` (a ``.py`` path or a dotted name), running the user's module code."""
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    cwd = str(Path.cwd())
    sys.path.insert(0, cwd)  # like `python -m`: modules beside the user's data, for this import only
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(cwd)  # left in, a stray file here could shadow a library for the whole run


def is_missing(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module (or its package) itself was not found, rather than something it imports."""
    return error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}."))


def import_function(spec: str, flag: str = "--reward") -> Callable:
    """``module:function`` or ``path/to/file.py:function``; a failure is one clear line.

    The module's own code failing is the user's bug: ``UserCodeError`` keeps its traceback.
    """
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise UserError(f"{flag} {spec}: expected module:function, path/to/file.py:function or a directory")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise UserError(f"{flag} {spec}: file {module_name} not found")
    try:
        module = load_module(module_name)
    except Exception as err:  # whatever the user's module code raises
        if isinstance(err, ModuleNotFoundError) and is_missing(err, module_name):
            raise UserError(f"{flag} {spec}: cannot import {module_name}: {err}") from err
        raise UserCodeError(f"{flag} {spec}: importing {module_name} raised {describe(err)}", err) from err
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{flag} {spec}: {module_name} has no function '{name}'")
    return function


def checked(function: Callable, spec: str, flag: str = "--reward") -> Reward:
    """Wrap a user function: its scores must be one finite float per completion."""

    def reward(prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        try:
            scores = function(list(prompts), list(completions))
        except Exception as err:  # any exception from the user's function
            raise UserCodeError(f"{flag} {spec}: the reward function raised {describe(err)}", err) from err
        try:
            values = torch.as_tensor(scores, dtype=torch.float32).flatten()
        except (TypeError, ValueError) as err:
            raise UserError(
                f"{flag} {spec}: expected one number per completion, the function returned "
                f"{type(scores).__name__} {reprlib.repr(scores)}"
            ) from err
        if len(values) != len(completions):
            raise UserError(f"{flag} {spec}: returned {len(values)} scores for {len(completions)} completions")
        if not torch.isfinite(values).all():
            raise UserError(f"{flag} {spec}: returned a NaN or infinite score ({values.tolist()[:8]})")
        return values

    return reward


def model_reward(directory: str, batch_size: int, device: torch.device, flag: str = "--reward") -> Reward:
    """A reward model scoring prompt + completion with its own tokenizer, normalised by its stats."""
    model, tokenizer, stats = rm.load_reward_model(directory, flag=flag)
    model.to(device)

    @torch.no_grad()
    def reward(prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        scores = []
        for start in range(0, len(completions), batch_size):
            rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
            chunk = zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True)
            for prompt, text in chunk:
                conversational = isinstance(prompt, list)
                answer = [{"role": "assistant", "content": text}] if conversational else text
                prompt_ids, answer_ids = prompt_and_answer(prompt, answer, conversational, tokenizer)
                rows["input_ids"].append(prompt_ids + answer_ids)
                rows["completion_mask"].append([0] * len(prompt_ids) + [1] * len(answer_ids))
            batch = pad_batch(rows, tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            scores.append(rm.reward_scores(model, ids, mask).float().cpu())
        return stats.normalise(torch.cat(scores))

    return reward


def ensemble_reward(
    directory: str, how: str, lam: float, batch_size: int, device: torch.device, flag: str = "--reward"
) -> Reward:
    """Each member scores (normalised by its own stats); ``rm.aggregate`` combines them."""
    members = [model_reward(str(m), batch_size, device, flag) for m in rm.ensemble_members(directory, flag)]

    def reward(prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        return rm.aggregate(torch.stack([m(prompts, completions) for m in members]), how, lam)

    return reward


def spec_terms(spec: str) -> list[tuple[str, str, str]]:
    """The ``(term, weight, source)`` of each ``+``-separated term of a reward spec (weight "1" when none)."""
    terms = []
    for term in (t.strip() for t in spec.split("+")):
        weight, _, source = term.rpartition("*") if "*" in term else ("1", "", term)
        terms.append((term, weight, source.strip()))
    return terms


def spec_paths(spec: str) -> list[str]:
    """The local paths a reward spec may read: directories and ``file.py`` (not ``module`` names)."""
    paths = []
    for _, _, source in spec_terms(spec):
        module = source.rpartition(":")[0]
        paths.append(module if module.endswith(".py") else source)
    return paths


def parse_reward(spec: str, batch_size: int = 16, device: torch.device | str = "cpu", ensemble_aggregate: str = "mean",
                 ensemble_lambda: float = 1.0, flag: str = "--reward") -> Reward:  # fmt: skip
    """Build the reward a spec describes (see the module docstring); errors name ``flag``."""
    terms = []
    for term, weight, source in spec_terms(spec):
        try:
            factor = float(weight)
        except ValueError:
            raise UserError(f"{flag} {spec}: weight '{weight}' of '{term}' is not a number") from None
        path = Path(source).expanduser()
        if (path / "ensemble.json").is_file():
            ensemble = ensemble_reward(source, ensemble_aggregate, ensemble_lambda, batch_size, device, flag)
            terms.append((factor, ensemble))
        elif path.is_dir():
            terms.append((factor, model_reward(source, batch_size, device, flag)))
        else:
            terms.append((factor, checked(import_function(source, flag), source, flag)))
    if len(terms) == 1 and math.isclose(terms[0][0], 1.0):
        return terms[0][1]
    return lambda prompts, completions: sum(w * r(prompts, completions) for w, r in terms)
