"""Pairs files: the comparisons people label, one JSON object a line (``.jsonl``).

Each row holds ``prompt`` (a string, or a list of chat messages ``{"role", "content"}``),
``response_a`` and ``response_b`` (non-empty, different strings), an optional ``id`` (string or
integer, unique; default: the row number) and an optional ``gold`` ("a" or "b": which response is
known to be better). Other fields are ignored. Rows are the non-blank lines, numbered from 1.
Every prompt in a file is of one kind (all strings or all message lists), as TRL's preference
format needs once the labels are exported. Errors name the file as the user gave it, the row and
the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.formats import ROLES
from posttrain.errors import UserError


@dataclass(frozen=True)
class PairRecord:
    """One comparison."""

    id: str  # the pairs file's id (or row number)
    prompt: str | list  # as in the file
    response_a: str
    response_b: str
    gold: str | None  # "a", "b" or None


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_pairs(path: Path, shown: str) -> tuple[list[PairRecord], str]:
    """The validated pairs of ``path`` and the SHA-256 of its bytes; UserError (naming ``shown``, the
    path as the user gave it) for the first problem found."""
    if path.suffix != ".jsonl":
        raise UserError(f"{shown}: a pairs file is JSON Lines and ends in .jsonl")
    if not path.is_file():
        raise UserError(f"{shown}: file not found")
    data = path.read_bytes()
    pairs: list[PairRecord] = []
    first_row_of_id: dict[str, int] = {}
    for row, value in enumerate(_json_rows(data, shown), start=1):
        pair = _pair(value, row, shown)
        if pair.id in first_row_of_id:
            raise UserError(f"{shown}: row {row}, field 'id': {pair.id!r} repeats row {first_row_of_id[pair.id]}")
        if pairs and isinstance(pair.prompt, str) != isinstance(pairs[0].prompt, str):
            kind = "a string" if isinstance(pairs[0].prompt, str) else "a list of messages"
            raise UserError(f"{shown}: row {row}, field 'prompt': expected {kind}, as in row 1")
        first_row_of_id[pair.id] = row
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{shown}: no rows")
    return pairs, hashlib.sha256(data).hexdigest()


def _json_rows(data: bytes, shown: str) -> list[dict[str, Any]]:
    """The JSON object of every non-blank line."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{shown}: line {number}: not valid UTF-8 (byte {err.start + 1}); save it as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{shown}: row {len(rows) + 1} (line {number}): not valid JSON: {err.msg}") from err
        if not isinstance(value, dict):
            raise UserError(f"{shown}: row {len(rows) + 1}: expected a JSON object {{...}}, got {type(value).__name__}")
        rows.append(value)
    return rows


def _pair(value: dict[str, Any], row: int, shown: str) -> PairRecord:
    """One row as a PairRecord, every field checked."""
    for name in ("prompt", "response_a", "response_b"):
        if name not in value:
            raise UserError(f"{shown}: row {row}: missing field {name!r}")
    where = f"{shown}: row {row}, field"
    problem = _prompt_problem(value["prompt"])
    if problem:
        raise UserError(f"{where} 'prompt': {problem}")
    for name in ("response_a", "response_b"):
        answer = value[name]
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(f"{where} {name!r}: expected a non-empty string, got {_short(answer)}")
    if value["response_a"] == value["response_b"]:
        raise UserError(f"{shown}: row {row}: fields 'response_a' and 'response_b' are the same answer")
    gold = value.get("gold")
    if gold not in (None, "a", "b"):
        raise UserError(f"{where} 'gold': expected 'a' or 'b', got {_short(gold)}")
    return PairRecord(_pair_id(value, row, shown), value["prompt"], value["response_a"], value["response_b"], gold)


def _pair_id(value: dict[str, Any], row: int, shown: str) -> str:
    """The row's ``id`` as a string (default: the row number)."""
    if "id" not in value:
        return str(row)
    pair_id = value["id"]
    if isinstance(pair_id, bool) or not isinstance(pair_id, str | int) or not str(pair_id).strip():
        got = _short(pair_id)
        raise UserError(f"{shown}: row {row}, field 'id': expected a non-empty string or an integer, got {got}")
    return str(pair_id)


def _prompt_problem(prompt: Any) -> str | None:
    """What is wrong with a prompt (a non-empty string or a non-empty list of messages), or None."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is empty"
    if not isinstance(prompt, list) or not prompt:
        return f"expected a string or a list of messages, got {_short(prompt)}"
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i}: expected {{'role': ..., 'content': '...'}}, got {_short(message)}"
        if message.get("role") not in ROLES:
            return f"message {i}: invalid role {_short(message.get('role'))}; valid roles: {', '.join(ROLES)}"
    return None


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: the message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON Lines through a file beside ``path``, moved into place at the end: a
    failure half-way leaves whatever ``path`` held before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        with staging.open("w", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
