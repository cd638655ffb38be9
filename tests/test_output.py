"""OUTPUT's contract: --overwrite never loses inputs or earlier results, one writer per OUTPUT,
--resume always works, the NaN guard stops before a bad update and never checkpoints NaN."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import qa_rows, write_jsonl
from posttrain.cli import main
from posttrain.data.loading import load_rows
from posttrain.errors import UserError
from posttrain.models.loading import load_tokenizer
from posttrain.stages.sft import SFTConfig, prepare, sft_loss
from posttrain.training import checkpoint as ckpt
from posttrain.training.loop import LossOutput, train
from posttrain.training.output import Lock, recover, sibling


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def sft(model: Path, data: Path, output: Path, *extra: str) -> int:
    return main(["sft", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
                 "--learning-rate", "1e-3", "--logging-steps", "1", *extra])  # fmt: skip


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("posttrain sft: error: ")


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows(16))


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_output_that_is_the_model_is_refused_and_the_model_kept(model_copy, data, capsys):
    before = snapshot(model_copy)
    assert sft(model_copy, data, model_copy, "--overwrite") == 2
    assert error_line(capsys) == f"--output {model_copy}: holds --model {model_copy}; write the run somewhere else"
    assert snapshot(model_copy) == before


def test_output_that_holds_the_data_or_lies_inside_the_model_is_refused(tiny_model, model_copy, data, capsys):
    before = snapshot(data.parent / "model")
    assert sft(tiny_model, data, data.parent, "--overwrite") == 2
    assert error_line(capsys).startswith(f"--output {data.parent}: holds --data {data}")
    assert data.read_text() == "".join(json.dumps(r) + "\n" for r in qa_rows(16))
    assert sft(model_copy, data, model_copy / "run") == 2
    assert error_line(capsys).startswith(f"--output {model_copy / 'run'}: lies inside --model {model_copy}")
    assert snapshot(model_copy) == before


def test_output_that_holds_the_config_file_is_refused(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sft.yaml").write_text("max_steps: 2\n")
    assert sft(tiny_model, data, out, "--overwrite", "--config", str(out / "sft.yaml")) == 2
    assert error_line(capsys).startswith(f"--output {out}: holds --config ")
    assert (out / "sft.yaml").is_file()


def test_failed_overwrite_leaves_earlier_results_exactly(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert sft(tiny_model, data, out, "--max-steps", "2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert sft(tiny_model, data, out, "--overwrite", "--batch-size", "64") == 2  # fails at the plan, after loading
    assert "fewer than one global batch" in error_line(capsys)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qa.jsonl"]  # no staging, no lock left


def test_overwrite_swaps_in_the_new_run_only_at_the_end(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    assert sft(tiny_model, data, out, "--max-steps", "2") == 0
    (out / "stale.txt").write_text("from before")
    assert sft(tiny_model, data, out, "--max-steps", "3", "--overwrite") == 0
    assert not (out / "stale.txt").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qa.jsonl"]


def test_a_second_writer_is_refused_naming_the_holder(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    held = Lock(out.absolute(), str(out))  # as another run holds it (flock conflicts across open files)
    try:
        for extra in ((), ("--resume",), ("--overwrite",)):
            assert sft(tiny_model, data, out, *extra) == 2
            assert error_line(capsys) == f"--output {out}: another run is writing to it (process {os.getpid()})"
        assert not out.exists()
    finally:
        held.release()
    assert sft(tiny_model, data, out, "--max-steps", "1") == 0  # released: the next run proceeds


def test_a_swap_cut_short_is_completed_by_the_next_claim(tmp_path):
    out = tmp_path / "out"
    new, old = sibling(out, "new"), sibling(out, "old")
    new.mkdir()
    (new / "weights").write_text("new")
    old.mkdir()
    (old / "weights").write_text("old")  # killed after OUTPUT -> .old, before .new -> OUTPUT
    recover(out)
    assert (out / "weights").read_text() == "new" and not old.exists() and not new.exists()
    new.mkdir()  # debris of an --overwrite run killed while training: the earlier OUTPUT stays
    recover(out)
    assert (out / "weights").read_text() == "new" and not new.exists()


def test_resume_before_the_first_checkpoint_starts_from_the_beginning(tiny_model, data, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("model: x\n")  # a run killed before its first checkpoint
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    with caplog.at_level("INFO", logger="posttrain"):
        assert sft(tiny_model, data, out, "--max-steps", "2", "--resume") == 0
    assert "no complete checkpoint" in caplog.text and "starting from the beginning" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sft(tiny_model, data, tmp_path / "fresh", "--max-steps", "1", "--resume") == 0  # no OUTPUT yet: starts


def test_resume_refuses_a_directory_that_is_not_a_run(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    assert sft(tiny_model, data, out, "--resume") == 2
    assert error_line(capsys) == f"--resume: {out} is not a posttrain run (no config.yaml); not touching it"
    assert sorted(p.name for p in out.iterdir()) == ["cat.jpg"]


def test_resume_skips_a_corrupt_newest_checkpoint_and_debris(tiny_model, tmp_path, caplog):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(32))
    extra = ("--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3")
    assert sft(tiny_model, data, tmp_path / "full", *extra) == 0
    out = tmp_path / "out"
    assert sft(tiny_model, data, out, "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3") == 0
    (out / "model.safetensors").unlink()
    newest = out / "checkpoints" / "step-00000004"
    (newest / "optimizer.safetensors").write_bytes(b"\x00garbage")  # e.g. a disk that lost the tail
    debris = out / "checkpoints" / ".tmp-step-00000006"
    debris.mkdir()
    with caplog.at_level("WARNING", logger="posttrain"):
        assert sft(tiny_model, data, out, *extra, "--resume") == 0
    assert f"{newest}: cannot be read" in caplog.text
    assert not debris.exists()
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in full:
        assert torch.equal(full[name], again[name]), name  # resumed from step 2: the same weights


def sft_setup(tiny_model: Path, tmp_path: Path, **overrides):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    config = SFTConfig(model=str(tiny_model), data=str(data), output=str(tmp_path / "out"), batch_size=4,
                       max_steps=10, save_steps=2, learning_rate=1e-3, **overrides)  # fmt: skip
    batches = prepare(load_rows(config.data), config.data, load_tokenizer(config.model), config)
    return config, batches, AutoModelForCausalLM.from_pretrained(tiny_model)


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_update(tiny_model, tmp_path):
    config, batches, model = sft_setup(tiny_model, tmp_path)
    calls = []

    def nan_gradient(model, batch):
        calls.append(1)
        out = sft_loss(model, batch)
        if len(calls) == 5:  # finite value, NaN gradient: 0 where sqrt(-1) is never chosen
            weight = next(model.parameters())
            out = LossOutput(out.loss_sum + torch.where(torch.tensor(True), 0.0, (weight.sum() * 0 - 1).sqrt()),
                             out.metric_sums)  # fmt: skip
        return out

    with pytest.raises(UserError, match=r"the gradient norm is nan; stopped before the update\. .*step-00000004"):
        train(model, batches, None, nan_gradient, config, Accelerator(cpu=True), tmp_path / "out")
    saved = load_file(ckpt.latest_checkpoint(tmp_path / "out" / "checkpoints") / "model.safetensors")
    for name, tensor in ckpt.trainable_state(model).items():
        assert torch.equal(saved[name], tensor), name  # the step-5 update was not applied
        assert torch.isfinite(tensor).all()


def test_a_checkpoint_is_never_written_with_non_finite_weights(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    directory = tmp_path / "checkpoints"
    state = {"step": 2}
    ckpt.save_checkpoint(directory, model, optimizer, scheduler, Accelerator(cpu=True), state, keep=2)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")  # as an overflowing update would leave them
    with pytest.raises(UserError, match=r"weights hold NaN or infinity after step 4 .*step-00000002"):
        ckpt.save_checkpoint(directory, model, optimizer, scheduler, Accelerator(cpu=True), {"step": 4}, keep=2)
    assert [p.name for p in directory.iterdir()] == ["step-00000002"]
