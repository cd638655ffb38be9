"""``posttrain annotate``: add-annotator, export, sample, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import qa_rows, write_jsonl
from posttrain.annotate.pairs import read_pairs
from posttrain.annotate.sample import make_pairs
from posttrain.annotate.store import Store
from posttrain.cli import main
from posttrain.errors import UserError


@pytest.fixture
def db(tmp_path) -> Path:
    """A database of three pairs: p1 labelled a by ann and b by bob (a majority tie, which Dawid–Skene resolves:
    the annotators are not symmetric, ann labelled p2 too), p2 labelled b by ann, p3 unlabelled."""
    rows = [{"id": f"p{i}", "prompt": f"q{i}", "response_a": f"a{i}", "response_b": f"b{i}"} for i in (1, 2, 3)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    store = Store.create_or_open(tmp_path / "labels.db", pairs, 2, 0.0, 0, str(pairs))
    for name in ("ann", "bob"):
        store.add_annotator(name)
    wanted = {("ann", "p1"): "a", ("bob", "p1"): "b", ("ann", "p2"): "b"}
    for name in ("ann", "bob"):
        while (assignment := store.next_assignment(name)) is not None:
            choice = wanted.get((name, assignment.pair.id))
            if choice is None:
                store.skip(name, assignment.id)
            else:
                store.record_label(name, assignment.id, choice, None, "")
    store.close()
    return tmp_path / "labels.db"


def test_add_annotator_prints_the_link(db, capsys):
    assert main(["annotate", "add-annotator", "cy", "--db", str(db), "--url", "http://lab:9000/"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("http://lab:9000/a/")
    token = out.strip().rsplit("/", 1)[1]
    assert Store.open(db).annotator_by_token(token).name == "cy"


@pytest.mark.parametrize(
    ("aggregate", "keep_ties", "rows", "dropped"),
    [("all", False, 3, 0), ("majority", False, 1, 1), ("majority", True, 2, 0), ("reliability", False, 2, 0)],
)
def test_export_writes_rows_and_says_how_many(db, tmp_path, capsys, aggregate, keep_ties, rows, dropped):
    output = tmp_path / "out" / "prefs.jsonl"
    argv = ["annotate", "export", "--db", str(db), "--output", str(output), "--aggregate", aggregate]
    assert main(argv + ["--keep-ties"] * keep_ties) == 0
    assert capsys.readouterr().out == f"wrote {rows} rows to {output} (dropped {dropped} ties)\n"
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(written) == rows and {"prompt", "chosen", "rejected", "pair_id", "gold"} <= set(written[0])


def bad_cases(tmp_path: Path, db: Path) -> list[tuple[list[str], str]]:
    """(argv, start of the error message): each must exit 2 and write nothing."""
    exists = tmp_path / "exists.jsonl"
    exists.write_text("old\n")
    text = tmp_path / "notes.db"
    text.write_text("not a database")
    empty = tmp_path / "empty.db"
    pairs = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "response_a": "x", "response_b": "y"}])
    Store.create_or_open(empty, pairs, 1, 0.0, 0, str(pairs)).close()
    out = str(tmp_path / "new.jsonl")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q"}])
    sample = ["annotate", "sample", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts)]
    return [
        (["annotate", "export", "--db", str(tmp_path / "none.db"), "--output", out], f"{tmp_path}/none.db: file not"),
        (["annotate", "export", "--db", str(text), "--output", out], f"{text}: not a posttrain annotate database"),
        (["annotate", "export", "--db", str(empty), "--output", out], f"{empty}: no labels yet"),
        (["annotate", "export", "--db", str(db), "--output", str(exists)], f"--output {exists}: exists; pass"),
        (["annotate", "export", "--db", str(db), "--output", str(db)], f"--output {db}: the export is JSON Lines"),
        (
            ["annotate", "export", "--db", str(db), "--output", str(tmp_path / "pairs.jsonl")],
            "--output " + str(tmp_path / "pairs.jsonl") + ": is the pairs file",
        ),
        (["annotate", "add-annotator", "ann", "--db", str(db)], "annotator 'ann' exists already"),
        (["annotate", "add-annotator", "a/b", "--db", str(db)], "annotator name 'a/b'"),
        (["annotate", "add-annotator", "cy", "--db", str(db), "--url", "lab:9000"], "--url lab:9000: expected"),
        ([*sample, "--output", out, "--per-prompt", "0"], "--per-prompt must be at least 1, got 0"),
        ([*sample, "--output", out, "--temperature", "0"], "--temperature must be positive"),
        ([*sample, "--output", str(exists)], f"--output {exists}: exists; pass --overwrite"),
        ([*sample, "--output", str(prompts)], f"--output {prompts}: is the --prompts file"),
        ([*sample, "--output", str(tmp_path / "pairs.txt")], "--output"),
    ]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_bad_input_exits_2_with_one_line_and_writes_nothing(db, tmp_path, capsys):
    for argv, message in bad_cases(tmp_path, db):
        capsys.readouterr()
        before = snapshot(tmp_path)
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"posttrain annotate: error: {message}"), captured.err
        assert snapshot(tmp_path) == before, argv


def test_debug_lets_the_error_through(db, tmp_path):
    with pytest.raises(UserError, match="exists already"):
        main(["annotate", "add-annotator", "ann", "--db", str(db), "--debug"])


def test_make_pairs_pairs_consecutive_answers_and_drops_identical_ones():
    answers = ["x", "y", "same", "same", "p", "q", " ", "r"]
    pairs, dropped = make_pairs(["first", "second"], answers, per_prompt=2)
    assert dropped == 2
    assert [(p["id"], p["prompt"], p["response_a"], p["response_b"]) for p in pairs] == [
        ("0-0", "first", "x", "y"),
        ("1-0", "second", "p", "q"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True])
def test_sample_writes_a_valid_pairs_file(tiny_model, tmp_path, capsys, conversational):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": r["prompt"]} for r in qa_rows(3, conversational=conversational)])  # fmt: skip
    output = tmp_path / "pairs.jsonl"
    argv = ["annotate", "sample", "--model", str(tiny_model), "--prompts", str(prompts), "--output", str(output),
            "--per-prompt", "2", "--max-new-tokens", "6", "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    pairs, _ = read_pairs(output, "pairs")
    message = capsys.readouterr().out
    assert (
        message == f"wrote {len(pairs)} pairs to {output} (dropped {6 - len(pairs)} with identical or empty answers)\n"
    )
    assert len(pairs) >= 4 and all(p.id.split("-")[1] in ("0", "1") for p in pairs)
    assert {p.id.split("-")[0] for p in pairs} <= {"0", "1", "2"}
    assert isinstance(pairs[0].prompt, list) == conversational
    first = output.read_bytes()
    assert main(argv) == 2  # exists: refused without --overwrite
    assert main([*argv, "--overwrite"]) == 0 and output.read_bytes() == first  # same seed, same pairs
