"""The bad-input corpus: every stage's malformed inputs end cleanly.

Each case runs a stage in-process on one malformed input (data, option, model, reward or
output) and checks the contract: exit code 2, exactly one non-empty line on stderr (captured
at the file-descriptor level, so library warnings and progress bars count), a line that names
the file, row or option, no traceback, and a pre-existing OUTPUT left byte for byte as it was
(most cases pass ``--overwrite``, which must not touch it before the run has something to show).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import preference_rows, qa_rows, write_jsonl
from posttrain.cli import main
from posttrain.training.output import Lock

REWARDS = """
def strings(prompts, completions):
    return ["good"] * len(completions)

def nones(prompts, completions):
    return [None] * len(completions)

def too_few(prompts, completions):
    return [1.0]
"""


@dataclass
class Files:
    """What a case can point at: good inputs, and the OUTPUT that must survive."""

    root: Path
    model: Path
    qa: Path
    prefs: Path
    prompts: Path
    rewards: Path
    output: Path

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def jsonl(self, name: str, rows: list[dict]) -> Path:
        return write_jsonl(self.root / name, rows)

    def broken_model(self, breaking: Callable[[Path], None]) -> Path:
        copy = Path(shutil.copytree(self.model, self.root / "broken-model"))
        breaking(copy)
        return copy


def sft(f: Files, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
    return ["sft", "--model", str(model or f.model), "--data", str(data or f.qa), "--output", str(f.output),
            "--batch-size", "4", "--max-steps", "2", "--overwrite", *extra]  # fmt: skip


def dpo(f: Files, *extra: str, data: Path | None = None) -> list[str]:
    return ["dpo", "--model", str(f.model), "--data", str(data or f.prefs), "--output", str(f.output),
            "--batch-size", "4", "--max-steps", "2", "--overwrite", *extra]  # fmt: skip


def grpo(f: Files, *extra: str, prompts: Path | None = None, reward: str = "") -> list[str]:
    return ["grpo", "--model", str(f.model), "--prompts", str(prompts or f.prompts), "--output", str(f.output),
            "--reward", reward or f"{f.rewards}:too_few", "--rollout-prompts", "2", "--num-generations", "2",
            "--batch-size", "4", "--max-new-tokens", "4", "--max-steps", "1", "--overwrite", *extra]  # fmt: skip


def ppo(f: Files, *extra: str) -> list[str]:
    return ["ppo", "--model", str(f.model), "--prompts", str(f.prompts), "--output", str(f.output),
            "--reward", f"{f.rewards}:strings", "--rollout-prompts", "4", "--batch-size", "4", "--overwrite",
            *extra]  # fmt: skip


def pickle_only(model: Path) -> None:
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def custom_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps({**config, "model_type": "x-custom", "auto_map": auto_map}))


def parquet_garbage(f: Files) -> Path:
    return f.write("data.parquet", b"PAR1 this is not parquet at all")


def csv_ragged(f: Files) -> Path:
    return f.write("data.csv", 'prompt,completion\n"a"," b"\n"c"," d"," e"," f"\n')


def parquet_wrong_type(f: Files) -> Path:
    path = f.root / "ints.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "completion": [1, 2, 3, 4]}), path)
    return path


def config_file(f: Files, text: str) -> str:
    return str(f.write("options.yaml", text))


def with_output(argv: list[str], output: Path) -> list[str]:
    at = argv.index("--output") + 1
    return [*argv[:at], str(output), *argv[at + 1 :]]


def hold_lock(f: Files) -> Callable[[], None]:
    lock = Lock(f.output.absolute(), str(f.output))
    return lock.release


# name -> (argv builder, words the one line must contain); a builder may return (argv, cleanup)
CASES: dict[str, tuple[Callable[[Files], list[str]], list[str]]] = {
    # data
    "empty jsonl": (lambda f: sft(f, data=f.write("empty.jsonl", "")), ["empty.jsonl"]),
    "blank jsonl": (lambda f: sft(f, data=f.write("blank.jsonl", "\n  \n")), ["blank.jsonl"]),
    "not utf-8": (
        lambda f: sft(f, data=f.write("latin.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"))),
        ["latin.jsonl", "UTF-8"],
    ),
    "malformed json line": (
        lambda f: sft(f, data=f.write("bad.jsonl", '{"prompt": "q", "completion": \n')),
        ["bad.jsonl", "line 1"],
    ),
    "unknown columns": (
        lambda f: sft(f, data=f.jsonl("q.jsonl", [{"question": "q", "answer": "a"}] * 4)),
        ["q.jsonl", "unknown data format"],
    ),
    "int completion": (
        lambda f: sft(f, data=f.jsonl("i.jsonl", [*qa_rows(3), {"prompt": "q", "completion": 7}])),
        ["i.jsonl", "row 4", "'completion'"],
    ),
    "empty completion": (
        lambda f: sft(f, data=f.jsonl("e.jsonl", [{"prompt": "q", "completion": ""}, *qa_rows(4)])),
        ["e.jsonl", "row 1", "is empty"],
    ),
    "invalid role": (
        lambda f: sft(f, data=f.jsonl("r.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}] * 4)),
        ["r.jsonl", "row 1", "invalid role"],
    ),
    "missing data file": (lambda f: sft(f, data=f.root / "nope.jsonl"), ["nope.jsonl", "not found"]),
    "unsupported extension": (lambda f: sft(f, data=f.write("data.txt", "hi\n")), ["data.txt", "unsupported"]),
    "garbage parquet": (lambda f: sft(f, data=parquet_garbage(f)), ["data.parquet"]),
    "ragged csv": (lambda f: sft(f, data=csv_ragged(f)), ["data.csv"]),
    "parquet of ints": (lambda f: sft(f, data=parquet_wrong_type(f)), ["ints.parquet", "'completion'"]),
    "preference data to sft": (lambda f: sft(f, data=f.prefs), ["prefs.jsonl", "sft needs"]),
    "sft data to dpo": (lambda f: dpo(f, data=f.qa), ["qa.jsonl", "dpo --loss sigmoid needs"]),
    "empty rl prompt": (
        lambda f: grpo(f, prompts=f.jsonl("p.jsonl", [{"prompt": "say a"}, {"prompt": ""}] * 2)),
        ["p.jsonl", "row 2", "'prompt'"],
    ),
    "rl prompts without prompt": (
        lambda f: grpo(f, prompts=f.jsonl("t.jsonl", [{"text": "a b"}] * 4)),
        ["t.jsonl", "'prompt'"],
    ),
    "eval split leaves nothing": (
        lambda f: sft(f, "--eval-split", "0.9", data=f.jsonl("few.jsonl", qa_rows(4))),
        ["--eval-split 0.9", "few.jsonl"],
    ),
    "batch larger than the data": (lambda f: sft(f, "--batch-size", "64"), ["--batch-size 64"]),
    # options
    "learning rate nan": (lambda f: sft(f, "--learning-rate", "nan"), ["--learning-rate", "finite"]),
    "learning rate inf": (lambda f: sft(f, "--learning-rate", "inf"), ["--learning-rate", "finite"]),
    "learning rate zero": (lambda f: sft(f, "--learning-rate", "0"), ["--learning-rate", "positive"]),
    "adam beta1 1.5": (lambda f: sft(f, "--adam-beta1", "1.5"), ["--adam-beta1", "[0, 1)"]),
    "adam epsilon -1": (lambda f: sft(f, "--adam-epsilon", "-1"), ["--adam-epsilon", "positive"]),
    "weight decay -1": (lambda f: sft(f, "--weight-decay", "-1"), ["--weight-decay", "non-negative"]),
    "max grad norm nan": (lambda f: sft(f, "--max-grad-norm", "nan"), ["--max-grad-norm", "finite"]),
    "lora rank -4": (lambda f: sft(f, "--lora-r", "-4"), ["--lora-r", "non-negative"]),
    "lora dropout 1": (lambda f: sft(f, "--lora-r", "4", "--lora-dropout", "1"), ["--lora-dropout"]),
    "fp16 without a gpu": (lambda f: sft(f, "--mixed-precision", "fp16"), ["--mixed-precision fp16", "GPU"]),
    "batch size 0": (lambda f: sft(f, "--batch-size", "0"), ["--batch-size", "at least 1"]),
    "warmup ratio 2": (lambda f: sft(f, "--warmup-ratio", "2"), ["--warmup-ratio"]),
    "max steps 0": (lambda f: sft(f, "--max-steps", "0"), ["--max-steps"]),
    "seed -1": (lambda f: sft(f, "--seed", "-1"), ["--seed", "non-negative"]),
    "resume and overwrite": (lambda f: sft(f, "--resume"), ["--resume and --overwrite"]),
    "dpo beta nan": (lambda f: dpo(f, "--beta", "nan"), ["--beta", "finite"]),
    "dpo beta 0": (lambda f: dpo(f, "--beta", "0"), ["--beta", "positive"]),
    "dpo cache dir is a file": (lambda f: dpo(f, "--precompute-ref", "--cache-dir", str(f.qa)), ["--cache-dir"]),
    "dpo label smoothing for ipo": (
        lambda f: dpo(f, "--loss", "ipo", "--label-smoothing", "0.1"),
        ["--label-smoothing"],
    ),
    "grpo top-p 0": (lambda f: grpo(f, "--top-p", "0"), ["--top-p", "(0, 1]"]),
    "grpo temperature 0": (lambda f: grpo(f, "--temperature", "0"), ["--temperature", "positive"]),
    "grpo one generation": (lambda f: grpo(f, "--num-generations", "1"), ["--num-generations"]),
    "grpo batch not dividing": (lambda f: grpo(f, "--batch-size", "3"), ["--batch-size"]),
    "ppo gamma 2": (lambda f: ppo(f, "--gamma", "2"), ["--gamma", "[0, 1]"]),
    "ppo kl coef -1": (lambda f: ppo(f, "--kl-coef", "-1"), ["--kl-coef", "non-negative"]),
    "config nan": (
        lambda f: sft(f, "--config", config_file(f, "learning_rate: .nan\n")),
        ["options.yaml", "learning_rate", "finite"],
    ),
    "config unknown key": (
        lambda f: sft(f, "--config", config_file(f, "learning_rat: 1.0e-4\n")),
        ["options.yaml", "learning_rat"],
    ),
    "config wrong type": (
        lambda f: sft(f, "--config", config_file(f, "batch_size: eight\n")),
        ["options.yaml", "batch_size"],
    ),
    "config not yaml": (lambda f: sft(f, "--config", config_file(f, "a: [\n")), ["options.yaml", "YAML"]),
    # models
    "model not found": (lambda f: sft(f, model=f.root / "no-model"), ["--model", "no-model", "not found"]),
    "model without weights": (
        lambda f: sft(f, model=f.broken_model(lambda m: (m / "config.json").unlink())),
        ["--model", "broken-model"],
    ),
    "pickle-only weights": (lambda f: sft(f, model=f.broken_model(pickle_only)), ["--model", "safetensors"]),
    "garbage safetensors": (
        lambda f: sft(f, model=f.broken_model(lambda m: (m / "model.safetensors").write_bytes(b"junk" * 20))),
        ["--model", "model.safetensors"],
    ),
    "custom code without trust": (
        lambda f: sft(f, model=f.broken_model(custom_code)),
        ["--model", "--trust-remote-code"],
    ),
    # rewards
    "reward returns strings": (lambda f: grpo(f, reward=f"{f.rewards}:strings"), ["--reward", "strings"]),
    "reward returns None": (lambda f: grpo(f, reward=f"{f.rewards}:nones"), ["--reward", "nones"]),
    "reward returns too few": (lambda f: grpo(f, reward=f"{f.rewards}:too_few"), ["--reward", "too_few"]),
    "reward file not found": (lambda f: grpo(f, reward=f"{f.root / 'nope.py'}:fn"), ["--reward", "nope.py"]),
    "reward function missing": (lambda f: grpo(f, reward=f"{f.rewards}:absent"), ["--reward", "absent"]),
    "reward weight not a number": (lambda f: grpo(f, reward=f"x*{f.rewards}:strings"), ["--reward", "weight"]),
    # outputs
    "output is the model": (lambda f: with_output(sft(f), f.model), ["--output", "holds --model"]),
    "output holds the data": (lambda f: with_output(sft(f), f.root), ["--output", "holds --data"]),
    "output is a file": (lambda f: with_output(sft(f), f.write("a-file", "x")), ["--output", "not a directory"]),
    "second writer": (lambda f: (sft(f), hold_lock(f)), ["--output", "another run is writing", str(os.getpid())]),
    "second lab on a directory": (
        lambda f: (["lab", "--output", str(f.output), "--preset", "smoke"], hold_lock(f)),
        ["--output", "another run is writing"],
    ),
    "lab into a non-lab directory": (
        lambda f: ["lab", "--output", str(f.output), "--preset", "smoke"],
        ["--output", "something other than a lab run"],
    ),
    "resume into a non-run": (
        lambda f: [a for a in sft(f, "--resume") if a != "--overwrite"],
        ["--resume", "not a posttrain run"],
    ),
    "existing output without a flag": (
        lambda f: [a for a in sft(f) if a != "--overwrite"],
        ["--output", "not empty", "--overwrite"],
    ),
}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def files(tmp_path, tiny_model) -> Files:
    root = tmp_path / "in"
    root.mkdir()
    output = tmp_path / "earlier-run"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"the user's earlier results")
    (output / "notes.txt").write_text("keep me")
    rewards = root / "rewards.py"
    rewards.write_text(REWARDS)
    return Files(root, Path(tiny_model), write_jsonl(root / "qa.jsonl", qa_rows(16)),
                 write_jsonl(root / "prefs.jsonl", preference_rows(16)),
                 write_jsonl(root / "prompts.jsonl", [{"prompt": "say the cat"}] * 8), rewards, output)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line(case, files, capfd):
    build, words = CASES[case]
    built = build(files)
    argv, cleanup = built if isinstance(built, tuple) else (built, None)
    before = snapshot(files.output)
    inputs = snapshot(files.root)
    capfd.readouterr()
    try:
        code = main(argv)
    finally:
        if cleanup:
            cleanup()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"posttrain {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(files.output) == before
    assert snapshot(files.root) == inputs  # no input was touched either
    assert sorted(p.name for p in files.output.parent.iterdir()) == ["earlier-run", "in"]  # no staging, lock, litter


def test_the_corpus_is_large():
    assert len(CASES) >= 40
