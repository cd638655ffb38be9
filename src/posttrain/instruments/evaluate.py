"""``posttrain eval``: accuracy, abstention, hallucination and calibration of one or several models on
one evaluation file, side by side.

Every model answers every question greedily (free form) or picks the likeliest choice (multiple
choice); the answers are judged by the rules of ``instruments.questions``; the rates come from
``ops.answer_rates``, the calibration figures from ``ops.calibration``, the confidences from
``instruments.answering``. OUTPUT gets ``eval.json``, ``answers.jsonl``, ``eval.html`` and
``config.yaml``, written only once every model has been evaluated: a run stopped by bad input
writes nothing. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain import config as config_io
from posttrain.config import option, require
from posttrain.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list, metadata={"help": "model to evaluate: a directory or hub id; "
                                                                     "repeat the flag for several"})  # fmt: skip
    data: str = option("", "evaluation questions: a .jsonl/.json/.parquet/.csv file or a hub id (see docs/eval.md)")
    output: str = option("", "directory for eval.json, answers.jsonl and eval.html")
    ref: str = option("", "reference model: report each model's KL to it, on --kl-samples samples per question")
    gold: str = option("", "module:function (or file.py:function) judging free-form answers instead of answer keys: "
                       "f(prompts, responses) -> 'correct', 'wrong', 'abstained', 1 or 0 per response")  # fmt: skip
    abstention_phrases: str = option("", "file of abstention phrases, one a line, replacing the default list")
    abstention: str = option("", "module:function deciding abstention: f(prompts, responses) -> true/false each")
    max_new_tokens: int = option(64, "longest answer in tokens")
    batch_size: int = option(16, "prompts answered at once")
    seed: int = option(0, "seed of the KL samples and of the bootstrap intervals")
    max_questions: int = option(0, "evaluate the first N rows only (0: all)")
    max_length: int = option(1024, "prompts are cut to their last N tokens")
    kl_samples: int = option(4, "samples per question for the KL to --ref")
    data_split: str = option("train", "split to read when --data is a hub id")
    overwrite: bool = option(False, "replace a non-empty OUTPUT")
    trust_remote_code: bool = option(False, "allow model code from the model's repository to run")

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required (repeat it to compare models, or set `model:` in the config file)")
        for name in ("data", "output"):
            if not getattr(self, name):
                raise UserError(f"{config_io.flag(name)} is required (or set `{name}:` in the config file)")
        for name in ("max_new_tokens", "batch_size", "max_length", "kl_samples"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        for name in ("seed", "max_questions"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        if self.abstention and self.abstention_phrases:
            raise UserError("give either --abstention-phrases or --abstention, not both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_io.add_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> None:
    config = config_io.resolve(EvalConfig, args)
    output = check_output(config, args.config)
    questions, judges, models = prepare(config)
    results = [evaluate_model(config, m, questions, judges) for m in models]
    files = render(config, questions, results)
    publish(output, config.output, files)
    print(f"wrote {output / 'eval.html'} (numbers in {output / 'eval.json'})")


def check_output(config: EvalConfig, config_file: str | None) -> Path:
    """OUTPUT is no input of the run, and empty unless --overwrite."""
    from posttrain.rewards import spec_paths
    from posttrain.training.output import check_report_dir

    inputs = [("--model", m) for m in config.model] + [("--data", config.data), ("--ref", config.ref),
              ("--abstention-phrases", config.abstention_phrases), ("--config", config_file or "")]  # fmt: skip
    inputs += [(flag, p) for flag, spec in (("--gold", config.gold), ("--abstention", config.abstention)) if spec
               for p in spec_paths(spec)]  # fmt: skip
    return check_report_dir(config.output, [(flag, path) for flag, path in inputs if path], config.overwrite)


@dataclass
class Judges:
    """How answers are judged: the abstention detector, and the --gold function when given."""

    abstains: Any  # questions.Detector
    gold: Any = None  # the user's function
    gold_spec: str = ""


@dataclass
class Model:
    """A model to evaluate, checked, with its prompts tokenized."""

    name: str
    source: str
    tokenizer: Any
    prompt_ids: list[list[int]]


@dataclass
class Questions:
    rows: Any  # datasets.Dataset: the evaluated rows
    items: list  # questions.Question, one per row
    conversational: bool


def prepare(config: EvalConfig) -> tuple[Questions, Judges, list[Model]]:
    """Everything that can refuse the run, before any model is loaded: data, judges, tokenizers, prompts."""
    from posttrain.instruments import questions as q
    from posttrain.models.loading import check_model_dir, load_tokenizer
    from posttrain.rewards import import_function
    from posttrain.training.rollout import tokenize_prompts

    rows, items = q.read_questions(config.data, config.data_split, config.max_questions, bool(config.gold))
    if config.abstention:
        judges = Judges(q.checked_detector(import_function(config.abstention, "--abstention"), config.abstention))
    else:
        phrases = q.read_phrases(config.abstention_phrases) if config.abstention_phrases else q.DEFAULT_ABSTENTIONS
        judges = Judges(q.phrase_detector(phrases))
    if config.gold:
        judges.gold, judges.gold_spec = import_function(config.gold, "--gold"), config.gold
    models = []
    for name, source in zip(display_names(config.model), config.model, strict=True):
        check_model_dir(source, "--model", config.trust_remote_code)
        tokenizer = load_tokenizer(source, config.trust_remote_code)
        ids = list(tokenize_prompts(rows, tokenizer, config.max_length, config.data)["prompt_ids"])
        models.append(Model(name, source, tokenizer, ids))
    if config.ref:
        check_model_dir(config.ref, "--ref", config.trust_remote_code)
        vocabulary = load_tokenizer(config.ref, config.trust_remote_code, flag="--ref").get_vocab()
        for model in models:
            if model.tokenizer.get_vocab() != vocabulary:
                raise UserError(f"--ref {config.ref}: its tokenizer differs from --model {model.source}'s; "
                                "the KL compares token by token, so both need the same vocabulary")  # fmt: skip
    return Questions(rows, items, isinstance(items[0].prompt, list)), judges, models


def display_names(sources: list[str]) -> list[str]:
    """Each model's directory name (the hub id's last part), numbered when two share one."""
    names = [Path(s.rstrip("/")).name or s for s in sources]
    return [f"{n} ({names[:i].count(n) + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class ModelResult:
    name: str
    source: str
    responses: list[str]  # per question: the free-form answer, or the picked choice's text
    picks: list[int | None]  # per question: the picked choice (multiple choice), else None
    outcomes: list  # answer_rates.Outcome per question
    confidence_per_token: list[float]
    kl_to_ref: float | None


def evaluate_model(config: EvalConfig, model: Model, questions: Questions, judges: Judges) -> ModelResult:
    """Answer every question with one model, judge the answers, and measure the KL to --ref."""
    import torch

    from posttrain.instruments import answering
    from posttrain.models.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("eval: %s answers %d questions", model.source, len(questions.items))
    network = load_model(model.source, config.trust_remote_code).to(device).eval()
    items, ids = questions.items, model.prompt_ids
    free = [i for i, q in enumerate(items) if q.kind != "multiple_choice"]
    chosen = [i for i, q in enumerate(items) if q.kind == "multiple_choice"]
    answers = answering.greedy_answers(network, model.tokenizer, [ids[i] for i in free], config.batch_size,
                                       config.max_new_tokens)  # fmt: skip
    scores = answering.choice_log_probs(network, model.tokenizer, [ids[i] for i in chosen],
                                        [items[i].choices for i in chosen], questions.conversational,
                                        config.batch_size)  # fmt: skip
    responses: list[str] = [""] * len(items)
    picks: list[int | None] = [None] * len(items)
    confidence, per_token = [0.0] * len(items), [0.0] * len(items)
    for i, answer in zip(free, answers, strict=True):
        responses[i], confidence[i], per_token[i] = answer.text, answer.confidence, answer.confidence_per_token
    for i, choice_scores in zip(chosen, scores, strict=True):
        picks[i], confidence[i] = answering.pick(choice_scores)
        responses[i], per_token[i] = items[i].choices[picks[i]], confidence[i]
    outcomes = judge_all(items, responses, picks, confidence, judges)
    kl = None
    if config.ref:
        reference = load_model(config.ref, config.trust_remote_code, flag="--ref").to(device).eval()
        kl = answering.mean_kl(network, reference, model.tokenizer, ids, config.kl_samples, config.seed,
                               config.batch_size, config.max_new_tokens)  # fmt: skip
    return ModelResult(model.name, model.source, responses, picks, outcomes, per_token, kl)


def judge_all(items: list, responses: list[str], picks: list[int | None], confidence: list[float], judges: Judges):
    """One ``Outcome`` per question by the rules of ``instruments.questions``."""
    from posttrain.instruments.questions import gold_labels, judge, judge_choice
    from posttrain.ops.answer_rates import Outcome

    prompts = [q.prompt for q in items]
    abstained = judges.abstains(prompts, responses)
    verdicts: dict[int, str | int] = {}
    if judges.gold is not None:  # it judges the answerable free-form questions
        judged = [i for i, q in enumerate(items) if q.kind == "free_form"]
        labels = gold_labels(
            judges.gold, judges.gold_spec, [prompts[i] for i in judged], [responses[i] for i in judged]
        )
        verdicts = dict(zip(judged, labels, strict=True))
    outcomes = []
    for i, question in enumerate(items):
        if question.kind == "multiple_choice":
            label = judge_choice(question, picks[i], abstained[i])
            length = None  # a pick has no length of its own
        else:
            label = judge(question, responses[i], abstained[i], verdicts.get(i))
            length = len(responses[i].split())
        outcomes.append(Outcome.from_label(label, question.answerable, confidence[i], length))
    return outcomes


def render(config: EvalConfig, questions: Questions, results: list[ModelResult]) -> dict[str, str]:
    """The files of OUTPUT, as text: eval.json, answers.jsonl, eval.html, config.yaml."""
    import dataclasses

    import yaml

    from posttrain.instruments.eval_report import answer_rows, html_page, summary

    report = summary(config, questions.items, results)
    rows = answer_rows(questions.items, results)
    return {
        "eval.json": json.dumps(report, indent=2) + "\n",
        "answers.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        "eval.html": html_page(report, rows),
        "config.yaml": yaml.safe_dump(dataclasses.asdict(config), sort_keys=False),
    }


def publish(output: Path, shown: str, files: dict[str, str]) -> None:
    """Write ``files`` into ``.NAME.new`` beside OUTPUT, then swap it in, under OUTPUT's lock: an
    earlier OUTPUT is replaced only by a complete new one."""
    from posttrain.training.output import Lock, recover, sibling

    output = output.absolute()
    lock = Lock(output, shown)
    try:
        recover(output)  # finish or undo a swap that a kill cut short
        staging, old = sibling(output, "new"), sibling(output, "old")
        staging.mkdir()
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if output.exists():
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    finally:
        lock.release()
