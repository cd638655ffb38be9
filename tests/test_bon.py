"""``posttrain bon`` on a tiny random model with rewards written as Python files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import qa_rows, write_jsonl
from posttrain.cli import main

# Each reward logs the scores it returns, so the test can recompute the estimates from the samples.
REWARDS = """
import json, pathlib

LOG = pathlib.Path(__file__).with_suffix(".log")


def _logged(name, scores):
    with LOG.open("a") as log:
        log.write(json.dumps({"name": name, "scores": scores}) + "\\n")
    return scores


def length(prompts, completions):
    return _logged("length", [float(len(c)) for c in completions])


def vowels(prompts, completions):
    return _logged("vowels", [float(sum(ch in "aeiou" for ch in c)) for c in completions])


def one_score(prompts, completions):
    return [0.0]


def nan(prompts, completions):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def files(tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in qa_rows(5)])
    return {"rewards": rewards, "prompts": prompts, "log": tmp_path / "rewards.log"}


def bon(tiny_model, files, output, *extra: str) -> int:
    return main(["bon", "--model", str(tiny_model), "--reward", f"{files['rewards']}:length",
                 "--prompts", str(files["prompts"]), "--output", str(output), "--max-new-tokens", "8",
                 "--batch-size", "8", "--max-prompts", "3", *extra])  # fmt: skip


def logged(log, name: str, per_prompt: int) -> np.ndarray:
    """The scores the reward ``name`` returned, as (prompts, samples per prompt)."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return np.array([x for e in entries if e["name"] == name for x in e["scores"]]).reshape(-1, per_prompt)


def test_writes_bon_json_with_estimates_from_the_samples(tiny_model, files, tmp_path):
    output = tmp_path / "out"
    assert bon(tiny_model, files, output, "--gold-reward", f"{files['rewards']}:vowels", "--n", "1,2,4") == 0
    result = json.loads((output / "bon.json").read_text())
    assert set(result) == {"config", "rows", "fits", "prompts", "samples_per_prompt"}
    assert (result["prompts"], result["samples_per_prompt"]) == (3, 4)
    assert [row["k"] for row in result["rows"]] == [1, 2, 4]
    assert set(result["rows"][0]) == {"k", "kl_bon", "sqrt_kl", "proxy", "proxy_ci", "gold", "gold_ci"}
    assert result["rows"][1]["kl_bon"] == pytest.approx(np.log(2) - 0.5)
    proxy, gold = logged(files["log"], "length", 4), logged(files["log"], "vowels", 4)
    assert proxy.shape == (3, 4)
    first, last = result["rows"][0], result["rows"][-1]
    assert first["proxy"] == pytest.approx(proxy.mean())  # k = 1: the mean of the samples
    assert first["gold"] == pytest.approx(gold.mean())
    assert last["proxy"] == pytest.approx(proxy.max(axis=1).mean())  # k = n: each prompt's best
    for row in result["rows"]:
        low, high = row["proxy_ci"]
        assert low <= row["proxy"] <= high
    assert set(result["fits"]) == {"proxy", "gold"}
    assert result["fits"]["gold"]["form"] == "bon" and result["fits"]["gold"]["n_points"] == 3
    assert yaml.safe_load((output / "config.yaml").read_text())["n"] == "1,2,4"
    assert (output / "bon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_gold_and_with_two_ks_there_is_no_fit(tiny_model, files, tmp_path):
    output = tmp_path / "out"
    assert bon(tiny_model, files, output, "--n", "1,2") == 0
    result = json.loads((output / "bon.json").read_text())
    assert result["fits"] == {"proxy": None, "gold": None}
    assert all(row["gold"] is None and row["gold_ci"] is None for row in result["rows"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("n", "message"),
    [("", "integers"), ("a,b", "integers"), ("1,,4", "integers"), ("1.5,2", "integers"), ("0,2", "at least 1"),
     ("4,2", "increasing"), ("1,2,2", "increasing")],
)  # fmt: skip
def test_bad_n_exits_2_with_one_line_and_writes_nothing(tiny_model, files, tmp_path, capsys, n, message):
    output = tmp_path / "out"
    assert bon(tiny_model, files, output, f"--n={n}") == 2
    line = one_error_line(capsys)
    assert "--n" in line and message in line
    assert not output.exists()


@pytest.mark.parametrize(
    ("gold", "message"),
    [("one_score", "returned 1 scores for 12 completions"), ("nan", "NaN"), ("missing", "no function 'missing'")],
)
def test_bad_gold_reward_exits_2_and_writes_nothing(tiny_model, files, tmp_path, capsys, gold, message):
    output = tmp_path / "out"
    assert bon(tiny_model, files, output, "--n", "1,4", "--gold-reward", f"{files['rewards']}:{gold}") == 2
    line = one_error_line(capsys)
    assert "--gold-reward" in line and message in line
    assert not output.exists()


def test_missing_prompts_file(tiny_model, files, tmp_path, capsys):
    files["prompts"] = tmp_path / "absent.jsonl"
    assert bon(tiny_model, files, tmp_path / "out", "--n", "1,2") == 2
    assert "--prompts" in one_error_line(capsys) and not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(tiny_model, files, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert bon(tiny_model, files, output, "--n", "1,2") == 2
    assert "--overwrite" in one_error_line(capsys)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert bon(tiny_model, files, output, "--n", "1,2", "--overwrite") == 0
    assert sorted(p.name for p in output.iterdir()) == ["bon.json", "bon.png", "config.yaml"]
