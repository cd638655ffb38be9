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
import os
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
    """Detect the format from the column names and the type of the first row's values.

    ``messages`` always holds message lists and ``text`` strings; the other columns may hold
    either, and the first row decides which the whole file holds.
    """
    present = set(dataset.column_names)
    for key, needed in FORMAT_COLUMNS.items():
        if set(needed) <= present:
            columns = ("prompt", *needed) if key == "preference" and "prompt" in present else needed
            name = key.removesuffix("_text")
            text_column = next(c for c in columns if c != "label")
            conversational = text_column == "messages" or (
                text_column != "text" and isinstance(dataset[0][text_column], list)
            )
            return DataFormat(name, columns, conversational)
    raise UserError(f"{source}: {_unknown_format_message(sorted(present))}")


def _unknown_format_message(columns: list[str]) -> str:
    hints = []
    for column in columns:
        close = difflib.get_close_matches(column, KNOWN_COLUMNS, n=1)
        if close and close[0] != column:
            hints.append(f"column {column!r}: did you mean '{close[0]}'?")
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
    kinds = _column_kinds(fmt)
    implicit = fmt.name == "preference" and "prompt" not in fmt.columns and fmt.conversational
    for row_number, row in _iter_rows(dataset, fmt.columns):
        for column in fmt.columns:
            problem = _check_value(kinds[column], column, row[column], fmt.conversational)
            if problem:
                raise UserError(f"{source}: row {row_number}: column '{column}': {problem}")
        problem = _check_implicit_prompt(row["chosen"], row["rejected"]) if implicit else None
        if problem:
            raise UserError(f"{source}: row {row_number}: columns 'chosen' and 'rejected': {problem}")


def _column_kinds(fmt: DataFormat) -> dict[str, str]:
    """What each column holds, which decides what a valid value is.

    ``prompt``: may be empty before an answer; ``sampled``: a prompt-only (RL) prompt, which
    may not, since nothing cannot be continued; ``answer``: follows a prompt column;
    ``whole``: a full text or conversation (``text``, ``messages``, implicit-prompt pairs).
    """
    kinds = {}
    for column in fmt.columns:
        if column == "prompt" and fmt.name == "prompt_only":
            kinds[column] = "sampled"
        elif column in ("prompt", "label"):
            kinds[column] = column
        elif "prompt" in fmt.columns:
            kinds[column] = "answer"
        else:
            kinds[column] = "whole"
    return kinds


def _iter_rows(dataset: datasets.Dataset, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    start = 1
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1024):
        size = len(batch[columns[0]])
        for offset in range(size):
            yield start + offset, {c: batch[c][offset] for c in columns}
        start += size


def _check_value(kind: str, column: str, value: Any, conversational: bool) -> str | None:
    """Describe what is wrong with one cell, or None when it is valid."""
    if kind == "label":
        return None if isinstance(value, bool) else f"expected true or false, got {_short(value)}"
    if conversational:
        return _check_messages(kind, column, value)
    if not isinstance(value, str):
        why = "" if column == "text" else " (the file's first row has strings here)"
        return f"expected a string{why}, got {type(value).__name__}"
    if kind != "prompt" and not value.strip():
        return "is empty"
    return None


def _check_messages(kind: str, column: str, messages: Any) -> str | None:
    if not isinstance(messages, list):
        why = "" if column == "messages" else " (the file's first row has messages here)"
        return f"expected a list of messages{why}, got {type(messages).__name__}"
    if not messages:
        return "is an empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i}: expected {{'role': ..., 'content': '...'}}, got {_short(message)}"
        if message.get("role") not in ROLES:
            return f"message {i}: invalid role {_short(message.get('role'))}; valid roles: {', '.join(ROLES)}"
    if column in ("completion", "chosen", "rejected") and not any(m["content"].strip() for m in messages):
        return "is empty"
    if kind == "answer" and messages[0]["role"] != "assistant":
        return f"message 0: an answer starts with an assistant message, not {messages[0]['role']!r}"
    if column == "messages":
        return _check_conversation(messages)
    return None


def _check_conversation(messages: list[dict]) -> str | None:
    """Loss is taken on assistant turns, each predicted from the messages before it: one must come first."""
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant message to learn from"
    if messages[0]["role"] == "assistant":
        return "message 0: an assistant message cannot come first; a system or user message must precede it"
    return None


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from answers that share their prompt as a common prefix.

    Conversations: the longest run of identical leading messages. Strings: the longest
    common character prefix (TRL's ``extract_prompt``). Either way each answer keeps at least
    its last message or character: an answer that is a prefix of the other (or equal to it)
    would otherwise be empty, with no token to score.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    common = len(os.path.commonprefix([chosen, rejected]))  # noqa: RUF071 -- character-wise on purpose, as TRL
    n = min(common, len(chosen) - 1, len(rejected) - 1)
    return chosen[:n], chosen[n:], rejected[n:]


def _check_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> str | None:
    """Conversations without a prompt column: their shared leading messages must form a prompt, then answers."""
    prompt, chosen_answer, rejected_answer = split_implicit_prompt(chosen, rejected)
    if not prompt:
        return "the conversations share no leading message, so there is no prompt; add a 'prompt' column"
    if chosen_answer[0]["role"] != "assistant" or rejected_answer[0]["role"] != "assistant":
        return "the answers (after the messages both share) must start with an assistant message"
    return None


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value, cut to ``limit`` characters: error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
