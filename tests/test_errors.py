"""Bad input: exit code 2, one line on stderr naming the file, row and column (or the option), no traceback.

Nothing on disk is touched: no output directory is created, an existing one stays byte-for-byte
the same. Most cases call ``posttrain.cli.main`` in-process (fast); the subprocess tests check
the real command end to end, offline, and that ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import qa_rows, write_jsonl
from posttrain.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PREFIX = "posttrain sft: error: "


def one_line(stderr: str) -> str:
    """The error message of a run that failed as the contract says."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(PREFIX), stderr
    assert "Traceback" not in stderr
    return lines[0].removeprefix(PREFIX)


def sft_error(capsys, output: Path, *argv: str) -> str:
    """Run ``posttrain sft`` in-process on bad input; check exit code 2, one line, no OUTPUT created."""
    code = main(["sft", "--output", str(output), *argv])
    message = one_line(capsys.readouterr().err)
    assert code == 2, message
    assert not output.exists()
    return message


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def chat(n: int) -> list[dict]:
    return [{"messages": msgs(("user", "hi"), ("assistant", "hello"))} for _ in range(n)]


def with_row(rows: list[dict], number: int, row: dict) -> list[dict]:
    """``rows`` with its row ``number`` (1-based) replaced."""
    return [row if i == number else r for i, r in enumerate(rows, start=1)]


def conversational_string_completion() -> list[dict]:
    rows = qa_rows(4, conversational=True)
    rows[1]["completion"] = "a plain string"
    return rows


# name -> (rows, what the message must say besides the file's path)
BAD_ROWS = {
    "unknown format": ([{"question": "q", "answer": "a"}] * 3, ["unknown data format", "'question'", "'answer'"]),
    "misspelt column": (
        [{"promt": "q", "completion": " a"}] * 3,
        ["unknown data format", "column 'promt': did you mean 'prompt'?"],
    ),
    "int completion": (
        with_row(qa_rows(4), 3, {"prompt": "q", "completion": 7}),
        ["row 3", "column 'completion'", "expected a string", "got int"],
    ),
    "string completion in conversations": (
        conversational_string_completion(),
        ["row 2", "column 'completion'", "expected a list of messages", "got str"],
    ),
    "empty completion": (
        with_row(qa_rows(4), 2, {"prompt": "q", "completion": ""}),
        ["row 2", "column 'completion'", "is empty"],
    ),
    "blank completion": (
        with_row(qa_rows(4), 4, {"prompt": "q", "completion": " \n"}),
        ["row 4", "column 'completion'", "is empty"],
    ),
    "invalid role": (
        with_row(chat(3), 2, {"messages": msgs(("robot", "hi"), ("assistant", "hello"))}),
        ["row 2", "column 'messages'", "invalid role 'robot'", "valid roles: system, user, assistant, tool"],
    ),
    "no assistant message": (
        with_row(chat(3), 3, {"messages": msgs(("user", "hi"))}),
        ["row 3", "column 'messages'", "no assistant message"],
    ),
    "preference data": (
        [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3,
        ["sft needs language_modeling or prompt_completion data", "preference"],
    ),
}


@pytest.fixture
def good_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", qa_rows(8))


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows(case, capsys, tmp_path, tiny_model):
    rows, expected = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    message = sft_error(capsys, tmp_path / "out", "--model", str(tiny_model), "--data", str(data))
    assert message.startswith(f"{data}: ")
    for part in expected:
        assert part in message


def test_missing_data_file(capsys, tmp_path, tiny_model):
    data = tmp_path / "nope.jsonl"
    message = sft_error(capsys, tmp_path / "out", "--model", str(tiny_model), "--data", str(data))
    assert message == f"{data}: file not found"


def test_unsupported_extension(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.txt"
    data.write_text("prompt completion\n")
    message = sft_error(capsys, tmp_path / "out", "--model", str(tiny_model), "--data", str(data))
    assert message == f"{data}: unsupported file type '.txt'; use one of .jsonl, .json, .parquet, .csv"


def test_malformed_json_line(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    good = [json.dumps(row) for row in qa_rows(3)]
    data.write_text("\n".join([good[0], '{"prompt": "q", "completion": ', *good[1:]]) + "\n")
    message = sft_error(capsys, tmp_path / "out", "--model", str(tiny_model), "--data", str(data))
    assert message.startswith(f"{data}: line 2: not valid JSON: ")
    assert "column 31" in message


def test_model_directory_not_found(capsys, tmp_path, good_data):
    model = tmp_path / "no-model"
    message = sft_error(capsys, tmp_path / "out", "--model", str(model), "--data", str(good_data))
    assert message == f"--model {model}: directory not found"


def test_model_directory_without_a_model(capsys, tmp_path, good_data):
    model = tmp_path / "not-a-model"
    model.mkdir()
    message = sft_error(capsys, tmp_path / "out", "--model", str(model), "--data", str(good_data))
    assert message.startswith(f"--model {model}: no tokenizer in this directory (expected tokenizer.json")


def test_yaml_unknown_key(capsys, tmp_path, tiny_model, good_data):
    config = tmp_path / "sft.yaml"
    config.write_text("learning_rat: 1.0e-4\n")
    argv = ["--config", str(config), "--model", str(tiny_model), "--data", str(good_data)]
    message = sft_error(capsys, tmp_path / "out", *argv)
    assert message.startswith(f"{config}: unknown key 'learning_rat' (did you mean 'learning_rate'?); valid keys: ")
    assert "batch_size" in message and "packing" in message


def test_yaml_wrong_type(capsys, tmp_path, tiny_model, good_data):
    config = tmp_path / "sft.yaml"
    config.write_text("batch_size: eight\n")
    argv = ["--config", str(config), "--model", str(tiny_model), "--data", str(good_data)]
    message = sft_error(capsys, tmp_path / "out", *argv)
    assert message == f"{config}: key 'batch_size': expected int, got 'eight'"


@pytest.mark.parametrize("missing", ["model", "data", "output"])
def test_required_option_missing(missing, capsys, tmp_path, tiny_model, good_data):
    output = tmp_path / "out"
    given = {"model": str(tiny_model), "data": str(good_data), "output": str(output)}
    argv = [arg for name, value in given.items() if name != missing for arg in (f"--{name}", value)]
    assert main(["sft", *argv]) == 2
    assert one_line(capsys.readouterr().err) == f"--{missing} is required (or set `{missing}:` in the config file)"
    assert not output.exists()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_existing_output_is_untouched(capsys, tmp_path, tiny_model, good_data):
    output = tmp_path / "out"
    (output / "checkpoints").mkdir(parents=True)
    (output / "model.safetensors").write_bytes(b"earlier run")
    (output / "checkpoints" / "state.json").write_text('{"step": 3}')
    before = snapshot(output)
    assert main(["sft", "--model", str(tiny_model), "--data", str(good_data), "--output", str(output)]) == 2
    message = one_line(capsys.readouterr().err)
    assert message == f"--output {output}: directory is not empty; pass --overwrite to replace it or --resume"
    assert snapshot(output) == before


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_missing_tracker(capsys, tmp_path, tiny_model, good_data):
    argv = ["--model", str(tiny_model), "--data", str(good_data), "--report-to", "tensorboard"]
    message = sft_error(capsys, tmp_path / "out", *argv)
    assert message == "--report-to tensorboard: the 'tensorboard' package is not installed"


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain", "sft", *argv]
    return subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("hub_id_for", ["model", "data"])
def test_hub_id_offline_end_to_end(hub_id_for, tmp_path, tiny_model, good_data):
    given = {"model": str(tiny_model), "data": str(good_data), hub_id_for: "some-org/some-thing"}
    result = run_cli("--model", given["model"], "--data", given["data"], "--output", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = one_line(result.stderr)
    start = "--model some-org/some-thing: " if hub_id_for == "model" else "some-org/some-thing: "
    assert message.startswith(start), message
    assert "cannot be loaded from the hub" in message or "not loadable from the hub" in message
    assert "(HF_HUB_OFFLINE is set)" in message
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, tiny_model):
    result = run_cli("--model", str(tiny_model), "--data", "nope.jsonl", "--output", "out", "--debug", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "posttrain.errors.UserError: nope.jsonl: file not found" in result.stderr
    assert not (tmp_path / "out").exists()
