"""The ``posttrain sft`` command on a tiny model: the loss falls and the output is a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import qa_rows, write_jsonl
from posttrain.cli import main


def records(output: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/loss" in r]


def run(tiny_model: Path, data: Path, output: Path, *extra: str) -> None:
    args = ["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(output), "--seed", "1"]
    assert main([*args, *extra]) == 0


def test_sft_learns_and_writes_a_loadable_checkpoint(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(240))
    run(tiny_model, data, tmp_path / "out", "--max-steps", "60", "--learning-rate", "3e-3", "--batch-size", "8",
        "--eval-split", "0.2", "--eval-steps", "30", "--logging-steps", "10", "--save-steps", "20")  # fmt: skip
    train, evals = records(tmp_path / "out")
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(train[0])
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    for (name, p), q in zip(model.named_parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, q), f"{name} did not change"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["learning_rate"] == 3e-3 and saved["eval_split"] == 0.2 and saved["packing"] is False


def test_lora_changes_only_adapted_weights(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(128))
    run(tiny_model, data, tmp_path / "out", "--max-steps", "20", "--learning-rate", "1e-2", "--lora-r", "4",
        "--lora-target-modules", "q_proj,v_proj", "--logging-steps", "5")  # fmt: skip
    train, _ = records(tmp_path / "out")
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    merged = load_file(tmp_path / "out" / "model.safetensors")
    start = load_file(Path(tiny_model) / "model.safetensors")
    assert merged.keys() == start.keys()  # merged back into a plain checkpoint
    for name in start:
        adapted = name.endswith(("q_proj.weight", "v_proj.weight"))
        assert torch.equal(merged[name], start[name]) != adapted, name


def test_conversational_packed_run_with_yaml_config_and_flag_override(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", qa_rows(160, conversational=True))
    config = tmp_path / "sft.yaml"
    config.write_text("max_steps: 30\nlearning_rate: 0.003\npacking: true\nmax_length: 128\nlogging_steps: 10\n")
    run(tiny_model, data, tmp_path / "out", "--config", str(config), "--max-steps", "20")
    train, _ = records(tmp_path / "out")
    assert train[-1]["step"] == 20  # the flag beat the file
    assert train[-1]["loss"] < train[0]["loss"]
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["packing"] is True and saved["max_steps"] == 20 and saved["learning_rate"] == 0.003


def test_overwrite_replaces_an_earlier_run(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    run(tiny_model, data, tmp_path / "out", "--max-steps", "2", "--logging-steps", "1")
    (tmp_path / "out" / "stale.txt").write_text("from before")
    run(tiny_model, data, tmp_path / "out", "--max-steps", "3", "--logging-steps", "1", "--overwrite")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert len(records(tmp_path / "out")[0]) == 3
