"""Broken model directories and failing reward functions end in one line naming the option, exit code 2.

A model directory is the tiny model with one file broken. A reward function that raises is the
user's bug: the line is followed by the traceback through the user's own code, not posttrain's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from posttrain.cli import main
from posttrain.errors import UserCodeError, UserError
from posttrain.models.loading import load_model
from posttrain.rewards import parse_reward


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def custom_code(directory: Path) -> None:
    auto_map = {"AutoConfig": "configuration_mystery.MysteryConfig", "AutoModelForCausalLM": "modeling_mystery.M"}
    edit_config(directory, model_type="mystery", auto_map=auto_map)


def pickle_only(directory: Path) -> None:
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name -> (how to break a copy of the tiny model, what the message must say)
BROKEN_MODELS = {
    "custom code": (custom_code, ["ships its own code", "--trust-remote-code", "runs that code on your machine"]),
    "unknown model_type": (lambda d: edit_config(d, model_type="mystery"), ["model_type 'mystery'", "not know"]),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'), ["not valid JSON"]),
    "pickle weights": (pickle_only, ["pytorch_model.bin", "safetensors only", "safe_serialization=True"]),
    "truncated safetensors": (lambda d: truncate(d / "model.safetensors"), ["model.safetensors cannot be read"]),
    "garbage safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 9),
        ["model.safetensors cannot be read"],
    ),
    "garbage tokenizer.json": (
        lambda d: (d / "tokenizer.json").write_text("not a tokenizer"),
        ["tokenizer.json cannot be read"],
    ),
}


def broken_copy(tiny_model: Path, target: Path, name: str) -> Path:
    shutil.copytree(tiny_model, target)
    BROKEN_MODELS[name][0](target)
    return target


@pytest.fixture
def no_progress_bars():
    """sft tokenizes before it loads the weights; its progress bars would share stderr with the error."""
    were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if were_on:
        datasets.enable_progress_bars()


@pytest.mark.parametrize("name", BROKEN_MODELS)
def test_broken_model_directory_is_one_line(tiny_model, tmp_path, capsys, no_progress_bars, name):
    bad = broken_copy(tiny_model, tmp_path / "bad-model", name)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    output = tmp_path / "out"
    code = main(["sft", "--model", str(bad), "--data", str(data), "--output", str(output)])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"posttrain sft: error: --model {bad}: "), err
    assert "Traceback" not in err
    for text in BROKEN_MODELS[name][1]:
        assert text in lines[0]
    assert code == 2
    assert not output.exists()


def test_broken_model_names_the_flag_it_came_from(tiny_model, tmp_path):
    bad = broken_copy(tiny_model, tmp_path / "bad-model", "truncated safetensors")
    with pytest.raises(UserError, match=rf"^--ref {bad}: model.safetensors cannot be read"):
        load_model(str(bad), flag="--ref")
    with pytest.raises(UserError, match=rf"^--reward {bad}: model.safetensors cannot be read"):
        parse_reward(str(bad))


REWARDS = """
def strings(prompts, completions):
    return ["good"] * len(completions)

def nothing(prompts, completions):
    return None

def holes(prompts, completions):
    return [None] * len(completions)

def check(text):
    raise ValueError(f"cannot score {text!r}")

def boom(prompts, completions):
    return [check(text) for text in completions]
"""


@pytest.fixture
def rewards_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.mark.parametrize(
    ("function", "returned"), [("strings", "list ['good']"), ("nothing", "NoneType None"), ("holes", "list [None]")]
)
def test_reward_returning_non_numbers_is_one_line(rewards_file, function, returned):
    spec = f"{rewards_file}:{function}"
    with pytest.raises(UserError, match="expected one number per completion") as caught:
        parse_reward(spec)(["p"], ["c"])
    assert str(caught.value) == f"--reward {spec}: expected one number per completion, the function returned {returned}"


def assert_user_frames_only(report: str, user_file: Path) -> None:
    assert f'File "{user_file}"' in report, report
    assert "posttrain/" not in report.replace("\\", "/"), report
    assert "importlib" not in report, report


def test_reward_function_that_raises_shows_the_users_traceback(rewards_file):
    spec = f"{rewards_file}:boom"
    with pytest.raises(UserCodeError) as caught:
        parse_reward(spec)(["p"], ["c"])
    assert str(caught.value) == f"--reward {spec}: the reward function raised ValueError: cannot score 'c'"
    report = caught.value.user_traceback()
    assert_user_frames_only(report, rewards_file)
    assert "in boom" in report and "in check" in report
    assert report.endswith("ValueError: cannot score 'c'\n")


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("raise RuntimeError('no settings')\n", "RuntimeError: no settings"),
        ("import helper_that_is_not_installed_\n", "ModuleNotFoundError: No module named"),
        ("def f(:\n", "SyntaxError"),
    ],
)
def test_reward_file_that_raises_on_import_shows_the_users_traceback(tmp_path, code, raised):
    path = tmp_path / "broken_rewards.py"
    path.write_text(code)
    with pytest.raises(UserCodeError, match=rf"^--reward {path}:f: importing {path} raised {raised}") as caught:
        parse_reward(f"{path}:f")
    assert_user_frames_only(caught.value.user_traceback(), path)


def test_reward_module_is_imported_without_leaving_the_working_directory_on_sys_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd_rules_ok.py").write_text("def f(prompts, completions):\n    return [1.0] * len(completions)\n")
    (tmp_path / "cwd_rules_broken.py").write_text("raise KeyError('x')\n")
    before = list(sys.path)
    try:
        torch.testing.assert_close(parse_reward("cwd_rules_ok:f")(["p"], ["c"]), torch.tensor([1.0]))
        assert sys.path == before
        with pytest.raises(UserCodeError, match="importing cwd_rules_broken raised KeyError: 'x'"):
            parse_reward("cwd_rules_broken:f")
        assert sys.path == before
        with pytest.raises(UserError, match="cannot import cwd_rules_missing"):
            parse_reward("cwd_rules_missing:f")
        assert sys.path == before
    finally:
        sys.modules.pop("cwd_rules_ok", None)


def test_cli_prints_one_line_then_the_users_traceback(tiny_model, tmp_path, rewards_file, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "say the cat"}] * 4)
    spec = f"{rewards_file}:boom"
    argv = ["grpo", "--model", str(tiny_model), "--reward", spec, "--prompts", str(prompts),
            "--output", str(tmp_path / "out"), "--max-steps", "1", "--rollout-prompts", "2",
            "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "4"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    first, *rest = err[err.index("posttrain grpo: error: ") :].splitlines()  # after the progress bars
    assert first.startswith(f"posttrain grpo: error: --reward {spec}: the reward function raised ValueError: ")
    end = next(i for i, line in enumerate(rest) if line.startswith("ValueError: cannot score "))
    assert_user_frames_only("\n".join(rest[: end + 1]), rewards_file)
    assert rest[0] == "Traceback (most recent call last):"
    assert "Traceback" not in err[: err.index("posttrain grpo: error: ")]
    assert code == 2
    argv[argv.index("--output") + 1] = str(tmp_path / "debug-out")
    with pytest.raises(UserCodeError):  # --debug: the whole traceback
        main([*argv, "--debug"])
