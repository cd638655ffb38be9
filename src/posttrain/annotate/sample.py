"""``posttrain annotate sample``: pairs of a model's answers to label, written as a pairs file.

For every prompt (any data file with a ``prompt`` column, a string or a list of messages, read and
tokenized as the RL stages read their prompts) the model samples 2·N answers (N = --per-prompt)
with the RL stages' sampler (``training.rollout.sample``); answers 2k and 2k + 1 form pair k, with
id "PROMPT-k" (PROMPT the prompt's 0-based row, k from 0). A pair whose two answers are the same,
or that holds an empty answer, is dropped (there is nothing to compare), and the count is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain import config as config_io
from posttrain.config import option, require
from posttrain.errors import UserError


@dataclass
class SampleConfig:
    model: str = option("", "the model to sample answers from: a local directory or a hub id")
    prompts: str = option("", "prompts: any data file with a 'prompt' column (a string or a list of messages)")
    output: str = option("", "the pairs file to write (.jsonl)")
    per_prompt: int = option(2, "pairs per prompt: 2 × N answers are sampled for each prompt")
    max_new_tokens: int = option(64, "longest answer in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling threshold")
    seed: int = option(0, "random seed of the sampling")
    batch_size: int = option(16, "answers sampled per batch")
    max_length: int = option(512, "prompts are cut to their last N tokens")
    overwrite: bool = option(False, "replace an existing OUTPUT")
    trust_remote_code: bool = option(False, "allow model code from the model's repository to run")

    def validate(self) -> None:
        for name in ("model", "prompts", "output"):
            if not getattr(self, name):
                raise UserError(f"{config_io.flag(name)} is required (or set `{name}:` in the config file)")
        config_io.check_finite_floats(self)
        for name in ("per_prompt", "max_new_tokens", "batch_size", "max_length"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        require(self, "seed", self.seed >= 0, "non-negative")
        require(self, "temperature", self.temperature > 0, "positive (greedy answers to one prompt are all the same)")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]")
        output = Path(self.output).expanduser()
        if output.suffix != ".jsonl":
            raise UserError(f"--output {self.output}: a pairs file is JSON Lines; name it *.jsonl")
        if output.resolve() == Path(self.prompts).expanduser().resolve():
            raise UserError(f"--output {self.output}: is the --prompts file; write the pairs somewhere else")
        if output.exists() and not self.overwrite:
            raise UserError(f"--output {self.output}: exists; pass --overwrite to replace it")


def run_sample(config: SampleConfig) -> tuple[int, int]:
    """Sample, pair, write OUTPUT; returns (pairs written, pairs dropped). Nothing is written on bad input."""
    from posttrain.annotate.pairs import write_jsonl

    prompts, answers = sample_answers(config)
    pairs, dropped = make_pairs(prompts, answers, config.per_prompt)
    if not pairs:
        raise UserError(f"--output {config.output}: no pair left to write: all {dropped} sampled pairs had two "
                        "identical answers or an empty one; raise --temperature or --max-new-tokens")  # fmt: skip
    write_jsonl(Path(config.output).expanduser(), pairs)
    return len(pairs), dropped


def make_pairs(prompts: list[Any], answers: list[str], per_prompt: int) -> tuple[list[dict], int]:
    """Pairs from 2·per_prompt answers per prompt (prompt-major): answers 2k and 2k + 1 of prompt i are
    pair "i-k". Returns (pairs, number dropped for identical or empty answers)."""
    pairs, dropped = [], 0
    for i, prompt in enumerate(prompts):
        own = answers[2 * per_prompt * i : 2 * per_prompt * (i + 1)]
        for k in range(per_prompt):
            a, b = own[2 * k], own[2 * k + 1]
            if a == b or not a.strip() or not b.strip():
                dropped += 1
                continue
            pairs.append({"id": f"{i}-{k}", "prompt": prompt, "response_a": a, "response_b": b})
    return pairs, dropped


def sample_answers(config: SampleConfig) -> tuple[list[Any], list[str]]:
    """(prompts, 2·per_prompt answers per prompt, prompt-major), sampled with the RL stages' sampler."""
    import torch
    from accelerate.utils import set_seed

    from posttrain.data.loading import load_rows
    from posttrain.instruments.answering import SamplingSettings
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.stages.rl_common import decode
    from posttrain.training.rollout import sample, tokenize_prompts

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    try:
        rows = load_rows(config.prompts, "train")
    except UserError as err:
        raise UserError(f"--prompts {err}") from err
    rows = tokenize_prompts(rows, tokenizer, config.max_length, config.prompts)
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    model = load_model(config.model, trust_remote_code=config.trust_remote_code).eval().to(device)
    settings = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
    n = 2 * config.per_prompt
    prompt_ids = [ids for ids in rows["prompt_ids"] for _ in range(n)]
    set_seed(config.seed)
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), config.batch_size):
            rollout = sample(model, prompt_ids[start : start + config.batch_size], tokenizer, settings)
            answers += decode(rollout, tokenizer)
    return list(rows["prompt"]), answers
