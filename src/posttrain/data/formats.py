"""The dataset formats posttrain reads: TRL's documented formats, detected from the columns.

| format               | columns                         | standard (strings) / conversational (message lists) |
|----------------------|---------------------------------|------------------------------------------------------|
| language_modeling    | ``text`` or ``messages``        | ``text`` is standard, ``messages`` conversational     |
| prompt_completion    | ``prompt``, ``completion``      | both                                                 |
| preference           | [``prompt``], ``chosen``, ``rejected`` | both; without ``prompt`` the prompt is implicit |
| unpaired_preference  | ``prompt``, ``completion``, ``label`` | both; ``label`` is true (desirable) or false   |
| prompt_only          | ``prompt``                      | both (prompts for RL)                                |

Reference: https://huggingface.co/docs/trl/dataset_formats. Extra columns are ignored.
Every row is validated before training; the first bad row ends the run with one line
naming the file, the row (1-based) and the column.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets

from posttrain.errors import UserError

ROLES = ("system", "user", "assistant", "tool")

# Checked in this order: the first format whose columns are all present wins.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "language_modeling": ("messages",),
    "language_modeling_text": ("text",),
    "prompt_only": ("prompt",),
}
KNOWN_COLUMNS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "label")


@dataclass(frozen=True)
class DataFormat:
    """A detected format: its name, the columns holding text, and whether they hold messages."""

    name: str  # one of: language_modeling, prompt_completion, preference, unpaired_preference, prompt_only
    columns: tuple[str, ...]
    conversational: bool


def detect_format(dataset: datasets.Dataset, source: str) -> DataFormat:
    """Detect the format from the column names and the type of the first row's values."""
    present = set(dataset.column_names)
    for key, needed in FORMAT_COLUMNS.items():
        if set(needed) <= present:
            columns = ("prompt", *needed) if key == "preference" and "prompt" in present else needed
            name = key.removesuffix("_text")
            text_column = next(c for c in columns if c != "label")
            conversational = isinstance(dataset[0][text_column], list)
            return DataFormat(name, columns, conversational)
    raise UserError(f"{source}: {_unknown_format_message(sorted(present))}")


def _unknown_format_message(columns: list[str]) -> str:
    hints = []
    for column in columns:
        close = difflib.get_close_matches(column, KNOWN_COLUMNS, n=1)
        if close and close[0] != column:
            hints.append(f"column '{column}': did you mean '{close[0]}'?")
    expected = "text | messages | prompt+completion | [prompt+]chosen+rejected | prompt+completion+label | prompt"
    message = f"unknown data format: columns are {columns}; expected one of: {expected}"
    return "; ".join([message, *hints])


def require_format(fmt: DataFormat, allowed: tuple[str, ...], source: str, stage: str, columns: list[str]) -> None:
    """Refuse a format the stage cannot train on, naming the ones it can (and, for one, its missing columns)."""
    if fmt.name in allowed:
        return
    message = f"{source}: {stage} needs {' or '.join(allowed)} data, but this file is {fmt.name}"
    if len(allowed) == 1:
        missing = [c for c in FORMAT_COLUMNS[allowed[0]] if c not in columns]
        message += f" (missing column {', '.join(repr(c) for c in missing)})" if missing else ""
    raise UserError(message)


def validate_rows(dataset: datasets.Dataset, fmt: DataFormat, source: str) -> None:
    """Check every row of every format column, streaming in Arrow batches (flat memory)."""
    for row_number, row in _iter_rows(dataset, fmt.columns):
        for column in fmt.columns:
            problem = _check_value(column, row[column], fmt.conversational)
            if problem:
                raise UserError(f"{source}: row {row_number}: column '{column}': {problem}")


def _iter_rows(dataset: datasets.Dataset, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    start = 1
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1024):
        size = len(batch[columns[0]])
        for offset in range(size):
            yield start + offset, {c: batch[c][offset] for c in columns}
        start += size


def _check_value(column: str, value: Any, conversational: bool) -> str | None:
    """Describe what is wrong with one cell, or None when it is valid."""
    if column == "label":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if conversational:
        return _check_messages(column, value)
    if not isinstance(value, str):
        return f"expected a string (the file's first row has strings here), got {type(value).__name__}"
    if column != "prompt" and not value.strip():
        return "is empty"
    return None


def _check_messages(column: str, messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"expected a list of messages (the file's first row has messages here), got {type(messages).__name__}"
    if not messages:
        return "is an empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i}: expected {{'role': ..., 'content': '...'}}, got {message!r}"
        if message.get("role") not in ROLES:
            return f"message {i}: invalid role {message.get('role')!r}; valid roles: {', '.join(ROLES)}"
    if column in ("completion", "chosen", "rejected") and not any(m["content"].strip() for m in messages):
        return "is empty"
    if column == "messages" and not any(m["role"] == "assistant" for m in messages):
        return "has no assistant message to learn from"
    return None
