"""Data files that cannot be read, and row shapes that used to end in a traceback: one line, exit code 2.

Empty and header-only files, non-UTF-8 text, garbage parquet, ragged CSV, RL prompts with
nothing to continue, and values of the wrong shape each end with one stderr line naming the
file (and, where there is one, the line or row and the column). Most cases run
``posttrain.cli.main`` in-process; one subprocess test checks that nothing else (library
warnings, progress bars) reaches stderr before the error line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import corpus, qa_rows, write_jsonl
from posttrain.cli import main
from posttrain.data.formats import detect_format, split_implicit_prompt
from posttrain.data.tokenize import tokenize_dataset
from posttrain.errors import UserError
from posttrain.models.factory import train_tokenizer
from posttrain.training.rollout import tokenize_prompts

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RULES = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    """The tests' tiny BPE tokenizer with its ChatML template, built once."""
    return train_tokenizer(corpus(), vocab_size=300)


def stage_error(capsys, stage: str, output: Path, *argv: str) -> str:
    """Run ``posttrain STAGE`` in-process; check exit code 2, exactly one stderr line, no OUTPUT created."""
    code = main([stage, "--output", str(output), *argv])
    stderr = capsys.readouterr().err
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    prefix = f"posttrain {stage}: error: "
    assert lines[0].startswith(prefix), stderr
    assert code == 2, stderr
    assert not output.exists()
    return lines[0].removeprefix(prefix)


def data_error(capsys, tmp_path: Path, model: Path, data: Path, stage: str = "sft", *extra: str) -> str:
    """The message of a stage run on ``data``, which must start with the file's path."""
    option = "--prompts" if stage == "grpo" else "--data"
    message = stage_error(capsys, stage, tmp_path / "out", "--model", str(model), option, str(data), *extra)
    assert message.startswith(f"{data}: "), message
    return message.removeprefix(f"{data}: ")


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def empty_parquet(path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
    pq.write_table(schema.empty_table(), path)


# name -> (file name, its bytes or a function writing it, the message after "FILE: ")
NO_ROWS = {
    "empty jsonl": ("data.jsonl", b"", "the dataset has no rows (the file is empty)"),
    "empty csv": ("data.csv", b"", "the dataset has no rows (the file is empty)"),
    "whitespace jsonl": ("data.jsonl", b" \n\n\t \r\n", "the dataset has no rows (the file holds only whitespace)"),
    "whitespace json": ("data.json", b"\n  \n", "the dataset has no rows (the file holds only whitespace)"),
    "whitespace csv": ("data.csv", b"  \n\n", "the dataset has no rows (the file holds only whitespace)"),
    "header-only csv": ("data.csv", b"prompt,completion\n", "the dataset has no rows (the file holds a header)"),
    "empty json list": ("data.json", b"[]", "the dataset has no rows"),
    "header-only parquet": ("data.parquet", empty_parquet, "the dataset has no rows"),
}


@pytest.mark.parametrize("case", NO_ROWS)
def test_files_without_rows(case, capsys, tmp_path, tiny_model):
    name, content, expected = NO_ROWS[case]
    data = tmp_path / name
    if callable(content):
        content(data)
    else:
        data.write_bytes(content)
    assert data_error(capsys, tmp_path, tiny_model, data) == expected


GOOD = jsonl_text(qa_rows(2))
NOT_UTF8 = {  # a Latin-1 "é" (byte 0xe9) on line 3, after "caf"
    "jsonl": ("data.jsonl", (GOOD + '{"prompt": "caf\xe9", "completion": " x"}\n').encode("latin-1"), 16),
    "json": ("data.json", '[{"prompt": "a"},\n{"prompt": "b",\n"completion": "caf\xe9"}]'.encode("latin-1"), 19),
    "csv": ("data.csv", "prompt,completion\nsay a, a\ncaf\xe9,x\n".encode("latin-1"), 4),
}


@pytest.mark.parametrize("kind", NOT_UTF8)
def test_not_utf8_names_line_and_column(kind, capsys, tmp_path, tiny_model):
    name, content, column = NOT_UTF8[kind]
    data = tmp_path / name
    data.write_bytes(content)
    message = data_error(capsys, tmp_path, tiny_model, data)
    assert message == f"line 3: column {column}: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_garbage_parquet(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1 this is not a parquet file " * 8)
    message = data_error(capsys, tmp_path, tiny_model, data)
    assert message.startswith("cannot be read as parquet: Parquet magic bytes not found in footer")


def test_ragged_csv(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.csv"
    data.write_text("prompt,completion\nsay a, a\nsay b, b, extra\n")
    message = data_error(capsys, tmp_path, tiny_model, data)
    assert message.startswith("cannot be read as csv: ")
    assert "line 3" in message


def test_jsonl_of_empty_objects(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n{}\n")
    message = data_error(capsys, tmp_path, tiny_model, data)
    assert message == "the dataset has no columns: every line is an empty object {}"


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


@pytest.mark.parametrize("prompt", ["", " \n\t"])
def test_rl_prompt_with_nothing_to_continue(prompt, capsys, tmp_path, tiny_model, rules):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say a"}, {"prompt": prompt}, {"prompt": "say b"}])
    message = data_error(capsys, tmp_path, tiny_model, data, "grpo", "--reward", f"{rules}:length")
    assert message == "row 2: column 'prompt': is empty"


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


CHAT = msgs(("user", "hi"), ("assistant", "hello"))

# name -> (stage and its extra options, rows, the message after "FILE: ")
BAD_SHAPES = {
    "text holding messages": (["sft"], [{"text": CHAT}], "row 1: column 'text': expected a string, got list"),
    "messages holding strings": (
        ["sft"],
        [{"messages": "hi"}],
        "row 1: column 'messages': expected a list of messages, got str",
    ),
    "messages holding a dict": (
        ["sft"],
        [{"messages": CHAT[0]}],
        "row 1: column 'messages': expected a list of messages, got dict",
    ),
    "null message": (
        ["sft"],
        [{"messages": CHAT}, {"messages": [None, CHAT[1]]}],
        "row 2: column 'messages': message 0: expected {'role': ..., 'content': '...'}, got None",
    ),
    "assistant message first": (
        ["sft"],
        [{"messages": CHAT}, {"messages": msgs(("assistant", "hi"), ("user", "yo"), ("assistant", "hey"))}],
        "row 2: column 'messages': message 0: an assistant message cannot come first; "
        "a system or user message must precede it",
    ),
    "completion starting with a user message": (
        ["sft"],
        [{"prompt": msgs(("user", "hi")), "completion": msgs(("user", "again"), ("assistant", "yo"))}],
        "row 1: column 'completion': message 0: an answer starts with an assistant message, not 'user'",
    ),
    "chosen a number, then a string": (
        ["dpo"],
        [{"prompt": "q", "chosen": 5, "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"}],
        "row 1: column 'chosen': expected a string (the file's first row has strings here), got int",
    ),
    "integer labels": (
        ["dpo", "--loss", "kto"],
        [{"prompt": "q", "completion": " a", "label": True}, {"prompt": "q", "completion": " b", "label": 0}],
        "row 2: column 'label': expected true or false, got 0",
    ),
    "implicit prompt without shared messages": (
        ["dpo"],
        [{"chosen": msgs(("assistant", "yes")), "rejected": msgs(("assistant", "no"))}],
        "row 1: columns 'chosen' and 'rejected': the conversations share no leading message, "
        "so there is no prompt; add a 'prompt' column",
    ),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
def test_bad_row_shapes(case, capsys, tmp_path, tiny_model):
    (stage, *extra), rows, expected = BAD_SHAPES[case]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    assert data_error(capsys, tmp_path, tiny_model, data, stage, *extra) == expected


def test_column_names_datasets_cannot_look_up(capsys, tmp_path, tiny_model):
    """An empty column name beside a NUL one made datasets' schema cast raise a bare KeyError."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "completion": " a", "": {}, "\x00": None}])
    assert data_error(capsys, tmp_path, tiny_model, data).startswith("cannot be read as jsonl: ")


def test_nul_character_in_a_field_name(capsys, tmp_path, tiny_model):
    """Arrow cuts the name at the NUL; datasets then raised a KeyError reading the row."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": {"\x00": {}}, "completion": " a"}])
    message = data_error(capsys, tmp_path, tiny_model, data)
    assert message == "the column or field name '\\x00' holds a NUL character; rename it"


def test_a_column_named_like_an_output_is_ignored():
    """Extra columns are ignored, even one named ``length``, which tokenizing writes (it was a TypeError)."""
    rows = datasets.Dataset.from_list([{"text": "the cat sat", "length": "[]"}, {"text": "a dog", "length": "x"}])
    fmt = detect_format(rows, "data.csv")
    tokenized = tokenize_dataset(rows, fmt, tokenizer(), 64, "truncate", True, "data.csv")
    assert tokenized["length"] == [len(ids) for ids in tokenized["input_ids"]]


def test_rl_prompt_the_tokenizer_drops_entirely():
    """A tokenizer that normalises a prompt to nothing leaves no token to sample from."""
    core = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "<eos>": 2}, unk_token="<unk>"))
    core.normalizer = normalizers.Replace("x", "")
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    rows = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "xx"}])
    with pytest.raises(UserError, match=r"^p\.jsonl: row 2: column 'prompt': has no tokens"):
        tokenize_prompts(rows, words, 64, "p.jsonl")


def test_implicit_prompt_leaves_each_answer_a_character():
    assert split_implicit_prompt("say yes", "say yes please") == ("say ye", "s", "s please")
    assert split_implicit_prompt("same", "same") == ("sam", "e", "e")


def test_rl_prompts_kind_is_the_prompt_columns_own():
    """Message-list prompts next to a string ``text`` column are message lists (they were refused as strings)."""
    rows = datasets.Dataset.from_list([{"prompt": msgs(("user", "say a")), "text": "say a"}])
    tokenized = tokenize_prompts(rows, tokenizer(), 64, "prompts.jsonl")
    assert tokenized[0]["length"] > 0


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain", "sft", *argv]
    return subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_unreadable_files_print_only_the_error_line(tmp_path, tiny_model):
    """No "Failed to read file" log line, no warning, no progress bar: stderr is the error alone."""
    (tmp_path / "data.parquet").write_bytes(b"not a parquet file at all " * 8)
    (tmp_path / "data.csv").write_text("prompt,completion\nsay a, a\nsay b, b, extra\n")
    for name in ("data.parquet", "data.csv"):
        result = run_cli("--model", str(tiny_model), "--data", name, "--output", "out", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"posttrain sft: error: {name}: cannot be read as "), result.stderr
        assert result.stdout == ""
        assert not (tmp_path / "out").exists()
