"""``posttrain eval``: the judging rules, the command end to end on two tiny models whose answers are
known in advance, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import corpus, write_jsonl
from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.instruments.questions import (
    Question,
    gold_labels,
    judge,
    judge_choice,
    normalise,
    phrase_detector,
    read_phrases,
    read_questions,
)
from posttrain.models.factory import train_tokenizer


def make_parrot(directory: Path, reply: str, sharpness: float) -> Path:
    """A tiny Llama that answers every chat prompt with ``reply``, then stops.

    With the attention and MLP outputs zeroed, the last hidden state is the current token's
    normalised embedding h(t), so the model is a bigram table; the output row of each next token
    of the reply is set to ``sharpness``·h(t)/|h(t)| of the token before it (the first follows the
    "\\n" that ends the chat template's generation prompt). Larger ``sharpness``: surer answers.
    """
    tokenizer = train_tokenizer(corpus(), vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    chain = newline + tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), "a bigram table cannot repeat a token"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embedding = model.model.embed_tokens.weight
        for current, following in itertools.pairwise(chain):
            model.lm_head.weight[following] = sharpness * embedding[current] / embedding[current].norm()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def parrots(tmp_path_factory) -> tuple[Path, Path]:
    """``confident`` always answers "blue" (probability ≈ 1); ``unsure`` always "not sure <b>"."""
    root = tmp_path_factory.mktemp("parrots")
    return make_parrot(root / "confident", "blue", 3.0), make_parrot(root / "unsure", "not sure <b>", 1.0)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


ROWS = [
    {"prompt": chat("what is the colour of the sky"), "answer": ["Blue", "the sky is blue"]},
    {"prompt": chat("what sat on the mat <script>alert(1)</script>"), "answer": ["<script>alert(1)</script>"]},
    {"prompt": chat("when was the dog born"), "unanswerable": True},
    {"prompt": chat("which is the sky"), "choices": ["blue", "not sure", "cat"], "answer": "blue"},
    {"prompt": chat("which sat"), "choices": ["blue", "not sure", "cat"], "answer": 2},
]


# --- the judging rules ------------------------------------------------------------------------

FREE = Question(1, "q", "free_form", accepted=("Paris",))
NONE = Question(2, "q", "unanswerable")


def test_normalise_drops_case_punctuation_articles_and_apostrophes():
    assert normalise("  The CAT, sat!  on a mat. ") == "cat sat on mat"
    assert normalise("I don\u2019t know") == normalise("i dont KNOW") == "i dont know"
    assert normalise("?!") == ""


def test_free_form_rules_in_order():
    abstains = phrase_detector(["I don't know"])
    responses = ["", "It is Paris.", "I don't know, maybe Paris", "I don't know", "Lyon", "paris-ish"]
    verdicts = abstains(["q"] * len(responses), responses)
    labels = [judge(FREE, r, a) for r, a in zip(responses, verdicts, strict=True)]
    assert labels == ["no_answer", "correct", "correct", "abstained", "wrong", "correct"]
    assert judge(FREE, "Parisian", False) == "wrong"  # whole words only
    assert [judge(NONE, r, a) for r, a in [("Paris", False), ("I don't know", True), ("...", False)]] == [
        "wrong",
        "abstained",
        "no_answer",
    ]


def test_gold_verdicts_and_choices():
    assert judge(FREE, "Lyon", False, gold="correct") == "correct"  # the function's verdict stands
    assert judge(FREE, "Lyon", True, gold=0) == "abstained" and judge(FREE, "Lyon", False, gold=0) == "wrong"
    assert judge(FREE, "", False, gold="correct") == "no_answer"
    assert gold_labels(lambda p, r: ["correct", 1, 0.0, True], "g", ["q"] * 4, ["a"] * 4) == ["correct", 1, 0, 1]
    with pytest.raises(UserError, match="response 2: expected 'correct', 'wrong', 'abstained', 1 or 0, got nan"):
        gold_labels(lambda p, r: [1, math.nan], "g", ["q"] * 2, ["a"] * 2)
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        gold_labels(lambda p, r: [1], "g", ["q"] * 2, ["a"] * 2)
    mc = Question(3, "q", "multiple_choice", choices=("a", "b", "I don't know"), right_choice=0)
    assert [judge_choice(mc, 0, False), judge_choice(mc, 1, False), judge_choice(mc, 2, True)] == [
        "correct",
        "wrong",
        "abstained",
    ]


def test_abstention_phrase_file(tmp_path):
    (tmp_path / "phrases.txt").write_text("# mine\nno clue\n\npass\n")
    assert read_phrases(str(tmp_path / "phrases.txt")) == ("no clue", "pass")
    (tmp_path / "bad.txt").write_text("fine\n?!\n")
    with pytest.raises(UserError, match=r"bad.txt: line 2: '\?!' has no word"):
        read_phrases(str(tmp_path / "bad.txt"))


def test_csv_numbers_and_blank_cells(tmp_path):
    # pandas reads a number column with a blank as floats and NaN: 4 must stay "4", the blank be missing
    (tmp_path / "q.csv").write_text("prompt,answer,unanswerable\nwhat is 2+2,4,\nwho is x,,true\n")
    _, questions = read_questions(str(tmp_path / "q.csv"), "train", 0, gold=False)
    assert [(q.kind, q.accepted) for q in questions] == [("free_form", ("4",)), ("unanswerable", ())]


# --- the command end to end ---------------------------------------------------------------------


def eval_args(models: tuple[Path, ...], data: Path, output: Path, *extra: str) -> list[str]:
    named = [arg for m in models for arg in ("--model", str(m))]
    return ["eval", *named, "--data", str(data), "--output", str(output), "--max-new-tokens", "12", *extra]


RATE_KEYS = {"accuracy", "abstention", "abstention_answerable", "hallucination", "hallucination_unanswerable",
             "no_answer"}  # fmt: skip


def test_two_models_side_by_side(parrots, tmp_path):
    confident, unsure = parrots
    data = write_jsonl(tmp_path / "questions.jsonl", ROWS)
    out = tmp_path / "out"
    assert main(eval_args(parrots, data, out, "--ref", str(confident), "--kl-samples", "2")) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"data", "questions", "settings", "models"}
    assert report["questions"] == {"total": 5, "free_form": 2, "unanswerable": 1, "multiple_choice": 2}
    first, second = report["models"]
    assert (first["name"], second["name"]) == ("confident", "unsure") and first["path"] == str(confident)
    assert set(first) == {"name", "path", "questions", "rates", "mean_length", "calibration",
                          "calibration_per_token", "kl_to_ref"}  # fmt: skip
    assert set(first["rates"]) == RATE_KEYS
    assert all(set(r) == {"value", "ci_low", "ci_high", "n"} for r in first["rates"].values())
    # confident: "blue" everywhere: right on rows 1 and 4, wrong on 2 and 5, a hallucination on 3
    assert first["rates"]["accuracy"]["value"] == 0.5 and first["rates"]["accuracy"]["n"] == 4
    assert first["rates"]["hallucination"]["value"] == 3 / 5
    assert first["rates"]["hallucination_unanswerable"]["value"] == 1.0
    assert first["rates"]["abstention"]["value"] == 0.0
    # unsure: "not sure <b>" (and the "not sure" choice): abstains everywhere
    assert second["rates"]["abstention"]["value"] == 1.0 and second["rates"]["abstention_answerable"]["value"] == 1.0
    assert second["rates"]["hallucination"]["value"] == 0.0
    assert second["mean_length"]["value"] == 3.0 and second["mean_length"]["n"] == 3  # free-form answers only
    # calibration over stated answers: 5 answers at confidence ≈ 1, 2 right: ECE ≈ |0.4 − 1|
    assert first["calibration"]["n"] == 5 and first["calibration"]["ece"] == pytest.approx(0.6, abs=0.01)
    assert set(first["calibration"]) == {"n", "ece", "ece_adaptive", "brier", "bins"}
    assert second["calibration"] == {"n": 0, "ece": None, "ece_adaptive": None, "brier": None, "bins": []}
    # a model against itself: 0 up to float error (its log-probs come from the sampler's cached decoding, the
    # reference's from one forward)
    assert first["kl_to_ref"] == pytest.approx(0.0, abs=1e-5) and second["kl_to_ref"] > 1.0

    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["models"]["confident"]["outcome"] for a in answers] == ["correct", "wrong", "wrong", "correct", "wrong"]
    assert [a["models"]["unsure"]["outcome"] for a in answers] == ["abstained"] * 5
    assert answers[0]["models"]["confident"]["response"] == "blue"
    assert answers[3]["models"]["confident"]["choice"] == 0 and answers[4]["right_choice"] == 2
    assert answers[1]["models"]["unsure"]["response"] == "not sure <b>"

    page = (out / "eval.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page and "not sure &lt;b&gt;" in page
    assert page.count("data:image/png;base64,") == 3  # the rates, and a reliability diagram per model
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == [str(confident), str(unsure)] and saved["ref"] == str(confident)


def test_yaml_config_gold_and_abstention_functions_and_overwrite(parrots, tmp_path):
    confident, _ = parrots
    rows = [{"prompt": chat("colour?")}, {"prompt": chat("animal?")}, {"prompt": chat("why?"), "unanswerable": True}]
    data = write_jsonl(tmp_path / "questions.jsonl", rows)
    (tmp_path / "judge.py").write_text(
        "def gold(prompts, responses):\n"
        "    return [int('colour' in p[0]['content']) for p in prompts]\n"
        "def abstains(prompts, responses):\n"
        "    return ['why' in p[0]['content'] for p in prompts]\n"
    )
    config = tmp_path / "eval.yaml"
    options = {"model": str(confident), "max_new_tokens": 4, "gold": f"{tmp_path}/judge.py:gold"}
    config.write_text(yaml.safe_dump(options))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    args = ["eval", "--config", str(config), "--data", str(data), "--output", str(out), "--overwrite",
            "--abstention", f"{tmp_path}/judge.py:abstains"]  # fmt: skip
    assert main(args) == 0
    assert not (out / "stale.txt").exists()
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    # the gold function judges the answerable rows ("blue" is right only for the colour); the abstention
    # function marks the unanswerable one as abstained, though "blue" holds no abstention phrase
    assert [a["models"]["confident"]["outcome"] for a in answers] == ["correct", "wrong", "abstained"]
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["gold"] == f"{tmp_path}/judge.py:gold" and report["models"][0]["kl_to_ref"] is None
    assert report["settings"]["abstention"] == f"function {tmp_path}/judge.py:abstains"


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------


def files_under(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` and its bytes (Python's own bytecode cache aside)."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def run_bad(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    before = files_under(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert files_under(tmp_path) == before  # nothing written, nothing changed


def test_bad_input_before_any_model_is_loaded(parrots, tmp_path, capsys):
    confident, _ = parrots
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    out = str(tmp_path / "out")
    run_bad(capsys, tmp_path, ["eval", "--data", str(good), "--output", out], "--model is required")
    run_bad(capsys, tmp_path, eval_args((confident,), tmp_path / "missing.jsonl", Path(out)), "file not found")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    run_bad(capsys, tmp_path, eval_args((confident,), tmp_path / "broken.jsonl", Path(out)), "line 2: not valid JSON")
    no_key = write_jsonl(tmp_path / "no_key.jsonl", [ROWS[0], {"prompt": chat("and this?")}])
    run_bad(capsys, tmp_path, eval_args((confident,), no_key, Path(out)),
            f"{no_key}: row 2: column 'answer': missing")  # fmt: skip
    bad_choice = write_jsonl(tmp_path / "bad_choice.jsonl", [{"prompt": "p", "choices": ["a", "b"], "answer": "c"}])
    run_bad(capsys, tmp_path, eval_args((confident,), bad_choice, Path(out)),
            "row 1: column 'answer': 'c' is not one of the choices")  # fmt: skip
    run_bad(capsys, tmp_path, eval_args((confident,), good, Path(out), "--gold", "no_such_module_here:judge"),
            "--gold no_such_module_here:judge: cannot import")  # fmt: skip
    run_bad(capsys, tmp_path, eval_args((confident,), good, Path(out), "--abstention", "m:f", "--abstention-phrases",
                                        str(good)), "either --abstention-phrases or --abstention")  # fmt: skip
    (tmp_path / "models.yaml").write_text("model: [1, 2]\n")
    run_bad(capsys, tmp_path, ["eval", "--config", str(tmp_path / "models.yaml"), "--data", str(good), "--output", out],
            "key 'model': expected a string or a list of strings, got [1, 2]")  # fmt: skip
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    run_bad(capsys, tmp_path, eval_args((confident,), good, tmp_path / "full"), "directory is not empty")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return [1]", "returned 1 values for 2 responses"),
        ("return [1, float('nan')]", "response 2: expected 'correct', 'wrong', 'abstained', 1 or 0, got nan"),
        ("raise RuntimeError('boom')", "the function raised RuntimeError: boom"),
    ],
)
def test_gold_function_that_misbehaves(parrots, tmp_path, capsys, body, message):
    confident, _ = parrots
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": chat("colour?")}, {"prompt": chat("animal?")}])
    (tmp_path / "judge.py").write_text(f"def gold(prompts, responses):\n    {body}\n")
    before = files_under(tmp_path)
    args = eval_args(
        (confident,), data, tmp_path / "out", "--gold", f"{tmp_path}/judge.py:gold", "--max-new-tokens", "4"
    )
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert files_under(tmp_path) == before
