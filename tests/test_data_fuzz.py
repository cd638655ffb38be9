"""Property: whatever rows a data file holds, the loading path a stage takes ends in success or a UserError.

Rows are generated per format, mostly close to valid (so that tokenization is reached) and
mutated with wrong types, missing and extra keys, nulls, nested values, control and astral
characters and very long strings; they are written as .jsonl, .json, .csv or .parquet and
run through ``load_rows`` -> ``detect_format`` -> ``require_format`` -> ``validate_rows`` ->
tokenization, as the stage for that format runs them. Any other exception is a bug.

POSTTRAIN_FUZZ_EXAMPLES sets the examples per format (default 200, about 50 s for the file on two cores);
runs are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import WORDS, corpus
from posttrain.data.formats import ROLES, detect_format, require_format, validate_rows
from posttrain.data.loading import load_rows
from posttrain.data.preference import tokenize_preferences
from posttrain.data.tokenize import tokenize_dataset
from posttrain.errors import UserError
from posttrain.models.factory import train_tokenizer
from posttrain.training.rollout import tokenize_prompts

EXAMPLES = int(os.environ.get("POSTTRAIN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- values ----

ODD_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)  # control and astral chars
PLAIN_TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
LONG_TEXT = st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=3), st.integers(200, 2000))
SPECIAL = st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", "say <|pad|> it"])
TEXT = st.one_of(PLAIN_TEXT, ODD_TEXT, LONG_TEXT, SPECIAL)
BLANK = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u3000"), max_size=4)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
ANY_JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": ANY_JSON}, optional={"name": ANY_JSON}),
    st.fixed_dictionaries({"role": ANY_JSON}, optional={"content": TEXT}),
    ANY_JSON,
)
BAD_VALUE = st.one_of(ANY_JSON, BLANK, st.lists(BAD_MESSAGE, max_size=3))


def message(*roles: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({"role": st.sampled_from(roles), "content": TEXT})


def turns(first: st.SearchStrategy) -> st.SearchStrategy:
    """A message list: ``first``, then 0-3 messages of any role."""
    return st.builds(lambda head, tail: [head, *tail], first, st.lists(message(*ROLES), max_size=3))


PROMPT_MESSAGES = turns(message("system", "user"))
ANSWER_MESSAGES = turns(message("assistant"))
CONVERSATION = st.builds(lambda prompt, answer: prompt + answer, PROMPT_MESSAGES, ANSWER_MESSAGES)


def valid_value(column: str, conversational: bool) -> st.SearchStrategy:
    """What ``column`` should hold, in all its variety (odd unicode, long text, special-token text)."""
    if column == "label":
        return st.booleans()
    if column == "text" or not conversational:
        return TEXT
    return {"messages": CONVERSATION, "prompt": PROMPT_MESSAGES}.get(column, ANSWER_MESSAGES)


@st.composite
def valid_row(draw: st.DrawFn, columns: tuple[str, ...], conversational: bool) -> dict[str, Any]:
    """One row; without a prompt column, chosen and rejected share a prompt as their start (implicit prompt)."""
    row = {column: draw(valid_value(column, conversational)) for column in columns}
    if "chosen" in columns and "prompt" not in columns:
        prompt = draw(PROMPT_MESSAGES if conversational else st.one_of(st.just(""), TEXT))
        row = {key: prompt + value if key in ("chosen", "rejected") else value for key, value in row.items()}
    return row


@st.composite
def rows_of(draw: st.DrawFn, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """0-5 valid rows, then up to three mutations: a cell set to a wrong value, or a key dropped or added.

    Preference rows lose their prompt column half the time: the prompt is then implicit.
    """
    conversational = "messages" in columns or ("text" not in columns and draw(st.booleans()))
    if "chosen" in columns and draw(st.booleans()):
        columns = ("chosen", "rejected")
    rows = draw(st.lists(valid_row(columns, conversational), max_size=5))
    keys = st.one_of(st.sampled_from([*columns, "length", "input_ids", ""]), st.text(max_size=6))
    for _ in range(draw(st.integers(0, 3)) if rows else 0):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        key = draw(keys)
        if draw(st.booleans()):
            row[key] = draw(BAD_VALUE)
        else:
            row.pop(key, None)
    return rows


# ---- files ----

NAMES = itertools.count()


def write_rows(directory: Path, rows: list[dict[str, Any]], kind: str, ascii_only: bool) -> Path:
    """``rows`` in a fresh file of ``kind``; rows pyarrow cannot hold in one table go to a .jsonl instead."""
    path = directory / f"{next(NAMES)}.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=ascii_only), encoding="utf-8")
    elif kind == "csv":
        write_csv(path, rows)
    elif kind == "parquet":
        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            return write_rows(directory, rows, "jsonl", ascii_only)
    else:
        lines = "".join(json.dumps(row, ensure_ascii=ascii_only) + "\n" for row in rows)
        path.write_text(lines, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One column per key seen; strings as they are, other values as JSON text."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})


FILE_KIND = st.sampled_from(["jsonl", "jsonl", "json", "csv", "parquet"])
MAX_LENGTH = st.sampled_from([8, 64, 4096])
TRUNCATION = st.sampled_from(["truncate", "drop"])

# ---- the loading paths of the stages ----


@functools.cache
def tokenizer():
    """The tests' tiny byte-level BPE tokenizer with its ChatML template (built once: hypothesis reruns often)."""
    return train_tokenizer(corpus(), vocab_size=300)


@pytest.fixture(scope="module", autouse=True)
def quiet_private_cache(tmp_path_factory) -> Iterator[None]:
    """Arrow caches in a temporary directory, and no progress bars, for every example of this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        datasets.disable_progress_bars()
        yield
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-data")


def sft(rows: datasets.Dataset, source: str, max_length: int, truncation: str) -> None:
    fmt = detect_format(rows, source)
    require_format(fmt, ("language_modeling", "prompt_completion"), source, "sft", rows.column_names)
    validate_rows(rows, fmt, source)
    completion_only = max_length != 64  # one of the three lengths trains on every token
    tokenize_dataset(rows, fmt, tokenizer(), max_length, truncation, completion_only, source)


def preference(wanted: str) -> Callable[[datasets.Dataset, str, int, str], None]:
    def run(rows: datasets.Dataset, source: str, max_length: int, truncation: str) -> None:
        fmt = detect_format(rows, source)
        require_format(fmt, (wanted,), source, "dpo", rows.column_names)
        validate_rows(rows, fmt, source)
        tokenize_preferences(rows, fmt, tokenizer(), max_length, truncation, source)

    return run


def rl(rows: datasets.Dataset, source: str, max_length: int, truncation: str) -> None:
    tokenize_prompts(rows, tokenizer(), max_length, source)


# format -> (its columns, the stage paths that take it, one drawn per example; RL takes any file with a prompt)
FORMATS = {
    "text": (("text",), [sft]),
    "messages": (("messages",), [sft]),
    "prompt_completion": (("prompt", "completion"), [sft, rl]),
    "preference": (("prompt", "chosen", "rejected"), [preference("preference"), rl]),
    "unpaired_preference": (("prompt", "completion", "label"), [preference("unpaired_preference"), rl]),
    "prompt_only": (("prompt",), [rl]),
}


def check(path: Path, stage: Callable, max_length: int, truncation: str) -> None:
    """The stage path either succeeds or raises a one-line UserError naming the file.

    Any other exception propagates and fails the test.
    """
    source = str(path)
    try:
        stage(load_rows(source), source, max_length, truncation)
    except UserError as err:
        message = str(err)
        assert message.startswith(f"{source}: "), message
        assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize("name", FORMATS)
def test_loading_ends_in_success_or_user_error(name, data_dir):
    columns, stages = FORMATS[name]

    @FUZZ
    @given(rows=rows_of(columns), kind=FILE_KIND, ascii_only=st.booleans(), stage=st.sampled_from(stages),
           max_length=MAX_LENGTH, truncation=TRUNCATION)  # fmt: skip
    def fuzz(rows, kind, ascii_only, stage, max_length, truncation):
        check(write_rows(data_dir, rows, kind, ascii_only), stage, max_length, truncation)

    fuzz()
