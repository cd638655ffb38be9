"""Evaluation questions: the rows of an evaluation file, checked, and the rules that judge an answer.

A row holds a ``prompt`` (a string or chat messages) and one of:
  ``answer``                 free form: the accepted answer, a list of accepted answers, or an integer
  ``unanswerable: true``     nothing could answer it: the right response is to abstain
  ``choices`` + ``answer``   multiple choice: ``answer`` is the right choice's text or its 0-based index
With ``--gold module:function`` a row needs only its prompt: the function judges free-form answers.

Judging a free-form answer, in this order:
  1. a response with no letter or digit is ``no_answer``;
  2. an answerable question: the response holds an accepted answer -> ``correct`` (hedged or not);
     with ``--gold`` the function's verdict stands here instead;
  3. the response holds an abstention phrase -> ``abstained``;
  4. anything else is a stated answer that is wrong (``wrong``): a hallucination.
Matching is on normalised text (``normalise``), whole words only.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from posttrain.data.formats import DataFormat, validate_rows
from posttrain.data.loading import load_rows
from posttrain.errors import UserCodeError, UserError
from posttrain.rewards import describe

# Phrases that mark an abstention (written as read; matched after ``normalise``).
DEFAULT_ABSTENTIONS = (
    "I don't know",
    "I do not know",
    "don't know",
    "not sure",
    "unsure",
    "no idea",
    "not certain",
    "cannot answer",
    "can't answer",
    "unable to answer",
    "cannot say",
    "can't say",
    "cannot tell",
    "can't tell",
    "no information",
    "don't have information",
    "do not have information",
    "no way to know",
    "cannot be determined",
    "cannot know",
    "unknown",
)
KINDS = ("free_form", "unanswerable", "multiple_choice")
ANSWER_COLUMNS = ("answer", "unanswerable", "choices")

Detector = Callable[[Sequence[Any], Sequence[str]], list[bool]]  # (prompts, responses) -> abstained?


@dataclass(frozen=True)
class Question:
    row: int  # 1-based row of the file
    prompt: str | list[dict]
    kind: str  # one of KINDS
    accepted: tuple[str, ...] = ()  # free form: accepted answers (empty when --gold judges)
    choices: tuple[str, ...] = ()  # multiple choice
    right_choice: int | None = None  # multiple choice: index of the right choice

    @property
    def answerable(self) -> bool:
        return self.kind != "unanswerable"


def normalise(text: str) -> str:
    """Lower case, apostrophes dropped ("don't" -> "dont"), other punctuation and the articles a, an,
    the removed, whitespace collapsed: SQuAD's answer normalisation (Rajpurkar et al. 2016, "SQuAD:
    100,000+ Questions for Machine Comprehension of Text"), plus Unicode NFKC and kept apostrophes."""
    low = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "").replace("'", "")
    words = re.findall(r"\w+", low)
    return " ".join(w for w in words if w not in ("a", "an", "the") and w != "_")


def contains(response: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``response`` as whole words, both normalised."""
    wanted = normalise(phrase)
    return bool(wanted) and f" {wanted} " in f" {normalise(response)} "


def phrase_detector(phrases: Sequence[str]) -> Detector:
    """Abstained: the response contains one of ``phrases``."""
    return lambda prompts, responses: [any(contains(r, p) for p in phrases) for r in responses]


def read_phrases(path: str) -> tuple[str, ...]:
    """One abstention phrase a line; blank lines and lines starting with ``#`` are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--abstention-phrases {path}: file not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--abstention-phrases {path}: not valid UTF-8; save the file as UTF-8") from err
    phrases = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not normalise(line):
            raise UserError(f"--abstention-phrases {path}: line {number}: {line.strip()!r} has no word to match")
        phrases.append(line.strip())
    if not phrases:
        raise UserError(f"--abstention-phrases {path}: holds no phrase")
    return tuple(phrases)


def checked_detector(function: Callable, spec: str) -> Detector:
    """A user's ``f(prompts, responses)``: it must return one true/false (or 1/0) per response."""

    def detect(prompts: Sequence[Any], responses: Sequence[str]) -> list[bool]:
        verdicts = call_user(function, spec, "--abstention", prompts, responses)
        if any(not _is_flag(v) for v in verdicts):
            bad = next(v for v in verdicts if not _is_flag(v))
            raise UserError(f"--abstention {spec}: expected true or false per response, got {bad!r}")
        return [bool(v) for v in verdicts]

    return detect


def _is_flag(value: Any) -> bool:
    return value in (0, 1) and not (isinstance(value, float) and math.isnan(value))


def call_user(function: Callable, spec: str, flag: str, prompts: Sequence[Any], responses: Sequence[str]) -> list:
    """The user's function on (prompts, responses); it must return one value per response."""
    try:
        values = function(list(prompts), list(responses))
    except Exception as err:  # anything the user's code raises is theirs to see
        raise UserCodeError(f"{flag} {spec}: the function raised {describe(err)}", err) from err
    try:
        values = list(values)
    except TypeError as err:
        raise UserError(f"{flag} {spec}: expected a list, the function returned {type(values).__name__}") from err
    if len(values) != len(responses):
        raise UserError(f"{flag} {spec}: returned {len(values)} values for {len(responses)} responses")
    return values


def gold_labels(function: Callable, spec: str, prompts: Sequence[Any], responses: Sequence[str]) -> list[str | int]:
    """The ``--gold`` function's verdict per response: "correct", "wrong", "abstained", or 1 (correct) /
    0 (not correct: abstained when the response holds an abstention phrase, else wrong)."""
    verdicts = call_user(function, spec, "--gold", prompts, responses)
    for i, verdict in enumerate(verdicts):
        if isinstance(verdict, str) and verdict in ("correct", "wrong", "abstained"):
            continue
        if not isinstance(verdict, str) and _is_flag(verdict):
            verdicts[i] = int(verdict)
            continue
        raise UserError(
            f"--gold {spec}: response {i + 1}: expected 'correct', 'wrong', 'abstained', 1 or 0, got {verdict!r}"
        )
    return verdicts


def judge(question: Question, response: str, abstained: bool, gold: str | int | None = None) -> str:
    """The outcome label of a free-form ``response`` by the rules in the module docstring.

    ``abstained``: the abstention detector's verdict; ``gold``: the --gold function's, if any.
    """
    if not normalise(response):
        return "no_answer"
    if question.answerable and gold is not None:
        if isinstance(gold, str):
            return gold
        if gold == 1:
            return "correct"
    elif question.answerable and any(contains(response, a) for a in question.accepted):
        return "correct"
    return "abstained" if abstained else "wrong"


def judge_choice(question: Question, picked: int, abstained: bool) -> str:
    """Multiple choice: the right choice is correct; a choice that abstains ("I don't know") is
    abstained; any other choice is wrong."""
    if picked == question.right_choice:
        return "correct"
    return "abstained" if abstained else "wrong"


def read_questions(source: str, split: str, max_questions: int, gold: bool) -> tuple[datasets.Dataset, list[Question]]:
    """The rows of ``source`` (the first ``max_questions``, 0: all), every one checked, and their questions."""
    rows = load_rows(source, split)
    if max_questions:
        rows = rows.select(range(min(max_questions, len(rows))))
    if "prompt" not in rows.column_names:
        raise UserError(f"{source}: an evaluation file needs a 'prompt' column; columns are {rows.column_names}")
    conversational = isinstance(rows[0]["prompt"], list)
    validate_rows(rows, DataFormat("prompt_only", ("prompt",), conversational), source)
    present = [c for c in ANSWER_COLUMNS if c in rows.column_names]
    questions = []
    for index, row in enumerate(rows.select_columns(["prompt", *present])):
        values = {c: cell(row.get(c)) for c in ANSWER_COLUMNS}
        questions.append(parse_row(index + 1, row["prompt"], values, gold, source))
    return rows, questions


def cell(value: Any) -> Any:
    """A CSV cell as JSON would hold it: pandas reads an empty cell of a number column as NaN and the
    numbers around it as floats (4 -> 4.0)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_row(number: int, prompt: Any, values: dict[str, Any], gold: bool, source: str) -> Question:
    """One row's question; a row that is none of the kinds is an error naming the file, row and column."""

    def bad(column: str, problem: str) -> UserError:
        return UserError(f"{source}: row {number}: column '{column}': {problem}")

    answer, unanswerable, choices = values["answer"], values["unanswerable"], values["choices"]
    if unanswerable is not None and not isinstance(unanswerable, bool):
        raise bad("unanswerable", f"expected true or false, got {short(unanswerable)}")
    if unanswerable:
        if answer is not None or choices is not None:
            column = "answer" if answer is not None else "choices"
            raise bad(column, "an unanswerable question has none; remove it or set 'unanswerable' to false")
        return Question(number, prompt, "unanswerable")
    if choices is not None:
        options = parse_choices(choices, bad)
        if answer is None:
            raise bad("answer", "missing: a multiple-choice question needs the right choice's text or index")
        right = choice_index(answer, options, bad)
        return Question(number, prompt, "multiple_choice", choices=options, right_choice=right)
    if gold:
        return Question(number, prompt, "free_form", accepted_answers(answer, bad) if answer is not None else ())
    if answer is None:
        raise bad("answer", "missing: give the accepted answer(s), or 'unanswerable': true, or 'choices' and "
                  "'answer' (or judge the answers with --gold module:function)")  # fmt: skip
    return Question(number, prompt, "free_form", accepted_answers(answer, bad))


def accepted_answers(answer: Any, bad: Callable[[str, str], UserError]) -> tuple[str, ...]:
    """A free-form ``answer``: a string, a non-empty list of strings, or an integer (read as its digits)."""
    items = answer if isinstance(answer, list) else [answer]
    if not items:
        raise bad("answer", "is an empty list")
    accepted = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise bad("answer", f"expected a string, a list of strings or an integer, got {short(answer)}")
        if not normalise(str(item)):
            raise bad("answer", f"{str(item)!r} has no word to look for in a response")
        accepted.append(str(item))
    return tuple(accepted)


def parse_choices(choices: Any, bad: Callable[[str, str], UserError]) -> tuple[str, ...]:
    """At least two distinct, non-empty strings."""
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise bad("choices", f"expected a list of strings, got {short(choices)}")
    if len(choices) < 2:
        raise bad("choices", f"expected at least two choices, got {len(choices)}")
    if any(not c.strip() for c in choices):
        raise bad("choices", "a choice is empty")
    if len(set(choices)) < len(choices):
        raise bad("choices", "a choice appears twice")
    return tuple(choices)


def choice_index(answer: Any, choices: tuple[str, ...], bad: Callable[[str, str], UserError]) -> int:
    """The right choice: its 0-based index, or its text (also as a one-item list)."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise bad("answer", f"choice index {answer} is out of range: there are {len(choices)} choices (from 0)")
        return answer
    if isinstance(answer, str):
        if answer not in choices:
            raise bad("answer", f"{short(answer)} is not one of the choices {short(list(choices))}")
        return choices.index(answer)
    raise bad("answer", f"expected the right choice's text or 0-based index, got {short(answer)}")


def short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
