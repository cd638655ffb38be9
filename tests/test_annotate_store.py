"""The annotate store: pairs files, the assignment rule, labels, skips, leases, restarts and threads."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest

from posttrain.annotate.pairs import read_pairs
from posttrain.annotate.store import LEASE_SECONDS, Progress, Store
from posttrain.errors import UserError


def pairs_file(path: Path, regular: int, gold: int = 0, messages: bool = False) -> Path:
    """``regular`` pairs without gold, then ``gold`` pairs with gold "a" (ids r0.., g0..)."""
    rows = []
    for i in range(regular + gold):
        prompt = f"question {i}"
        row = {"id": f"r{i}" if i < regular else f"g{i - regular}", "response_a": f"a{i}", "response_b": f"b{i}",
               "prompt": [{"role": "user", "content": prompt}] if messages else prompt}  # fmt: skip
        if i >= regular:
            row["gold"] = "a"
        rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def new_store(tmp_path: Path, regular: int, gold: int = 0, overlap: int = 1, gold_rate: float = 0.0, seed: int = 0):
    pairs = pairs_file(tmp_path / "pairs.jsonl", regular, gold)
    return Store.create_or_open(tmp_path / "labels.db", pairs, overlap, gold_rate, seed, str(pairs))


def label_until_done(store: Store, names: list[str], choice: str = "a") -> list:
    """Annotators take turns asking and labelling until nobody is served anything; the assignments served."""
    served, active = [], list(names)
    while active:
        for name in list(active):
            assignment = store.next_assignment(name)
            if assignment is None:
                active.remove(name)
                continue
            served.append(assignment)
            assert store.record_label(name, assignment.id, choice, None, "")
    return served


# ---- pairs files ----


def test_pairs_file_ids_gold_and_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": [{"role": "user", "content": "hi"}], "response_a": "x", "response_b": "y", "gold": "b"}\n\n'
        '{"prompt": [{"role": "user", "content": "yo"}], "response_a": "x", "response_b": "z", "id": 7, "extra": 1}\n'
    )
    pairs, sha = read_pairs(path, "p.jsonl")
    assert [(p.id, p.gold) for p in pairs] == [("1", "b"), ("7", None)]
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}] and len(sha) == 64


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "p", "response_a": "x"}'], "P: row 1: missing field 'response_b'"),
        (['{"prompt": "p", "response_a": "x", "response_b": "y", "gold": "x"}'],
         "P: row 1, field 'gold': expected 'a' or 'b', got 'x'"),
        (['{"prompt": "p", "response_a": "x", "response_b": "y", "id": "k"}'] * 2,
         "P: row 2, field 'id': 'k' repeats row 1"),
        (['{"prompt": "p", "response_a": "x", "response_b": "y"}', '{"prompt": "p", "response_a": "x", '
          '"response_b": "y", "id": "1"}'], "P: row 2, field 'id': '1' repeats row 1"),
        (["", "  "], "P: no rows"),
        (['{"prompt": "p", "response_a": "x", "response_b": "x"}'], "P: row 1: fields 'response_a' and 'response_b'"),
        (['{"prompt": "p", "response_a": " ", "response_b": "x"}'],
         "P: row 1, field 'response_a': expected a non-empty"),
        (['{"prompt": "p", "response_a": "x", "response_b": "y"}', '{"prompt": [{"role": "user", "content": "q"}], '
          '"response_a": "x", "response_b": "y"}'], "P: row 2, field 'prompt': expected a string, as in row 1"),
        (['{"prompt": [{"role": "boss", "content": "q"}], "response_a": "x", "response_b": "y"}'],
         "P: row 1, field 'prompt': message 0: invalid role 'boss'"),
        (["[1, 2]"], "P: row 1: expected a JSON object"),
        (["{oops"], "P: row 1 (line 1): not valid JSON"),
    ],
)  # fmt: skip
def test_pairs_file_errors_name_row_and_field(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        read_pairs(path, "P")
    assert str(err.value).startswith(message)


# ---- creating and opening ----


def test_bad_settings_and_pairs_create_nothing(tmp_path):
    good, bad = pairs_file(tmp_path / "good.jsonl", 3), tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "x"}\n')
    db = tmp_path / "labels.db"
    cases = [
        (good, 0, 0.0, "--overlap must be at least 1, got 0"),
        (good, 1, 1.0, "--gold-rate must be in [0, 1), got 1.0"),
        (good, 1, -0.1, "--gold-rate must be in [0, 1)"),
        (good, 1, 0.2, "--gold-rate 0.2: no pair of"),
        (bad, 1, 0.0, "bad.jsonl: row 1: missing field 'response_b'"),
        (tmp_path / "missing.jsonl", 1, 0.0, "missing.jsonl: file not found"),
    ]
    for pairs, overlap, gold_rate, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            Store.create_or_open(db, pairs, overlap, gold_rate, 0, str(pairs))
        assert set(tmp_path.iterdir()) == {good, bad}


def test_existing_db_refuses_other_pairs_file_and_other_settings(tmp_path):
    store = new_store(tmp_path, 3, overlap=2)
    store.close()
    db, pairs = tmp_path / "labels.db", tmp_path / "pairs.jsonl"
    before = db.read_bytes()
    for overlap, gold_rate, seed, message in [(3, 0.0, 0, "--overlap 3 differs from 2 stored in"),
                                              (2, 0.0, 5, "--seed 5 differs from 0 stored in")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            Store.create_or_open(db, pairs, overlap, gold_rate, seed, "PAIRS")
    other = pairs_file(tmp_path / "other.jsonl", 4)
    with pytest.raises(UserError, match=r"labels.db: built from another pairs file \(OTHER differs\)"):
        Store.create_or_open(db, other, 2, 0.0, 0, "OTHER")
    with pytest.raises(UserError, match="is the pairs file"):
        Store.create_or_open(pairs, pairs, 2, 0.0, 0, "PAIRS")
    assert db.read_bytes() == before
    reopened = Store.create_or_open(db, pairs, 2, 0.0, 0, "PAIRS")
    assert reopened.settings() == {"overlap": 2, "gold_rate": 0.0, "seed": 0, "pairs": 3,
                                   "pairs_sha256": read_pairs(pairs, "")[1], "pairs_file": str(pairs)}  # fmt: skip


def test_open_refuses_missing_and_foreign_files(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("hello")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    for path, message in [(tmp_path / "none.db", "file not found"), (text, "not a posttrain annotate database"),
                          (foreign, "not a posttrain annotate database")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            Store.open(path)
    assert text.read_text() == "hello"


def test_annotators_tokens_are_stored_hashed(tmp_path):
    store = new_store(tmp_path, 2)
    token = store.add_annotator("alice")
    assert store.annotator_by_token(token).name == "alice" and store.annotator_by_token(token + "x") is None
    for name, message in [("alice", "exists already"), ("", "annotator name ''"), ("a b", "annotator name 'a b'")]:
        with pytest.raises(UserError, match=message):
            store.add_annotator(name)
    assert [a.name for a in store.annotators()] == ["alice"]
    store.close()
    assert token.encode() not in (tmp_path / "labels.db").read_bytes()


# ---- the assignment rule ----


def test_overlap_filled_exactly_and_evenly_nobody_served_twice(tmp_path):
    store = new_store(tmp_path, 10, overlap=3)
    names = ["ann", "bob", "cy", "dee"]
    for name in names:
        store.add_annotator(name)
    served = label_until_done(store, names)
    assert len(served) == 30
    assert Counter(a.pair.id for a in served) == {f"r{i}": 3 for i in range(10)}
    assert len({(a.annotator, a.pair.id) for a in served}) == 30
    assert sorted(Counter(a.annotator for a in served).values()) == [7, 7, 8, 8]
    assert all(store.progress(name).remaining == 0 for name in names)
    assert sum(store.progress(name).done for name in names) == len(store.labels()) == 30


def test_checks_come_at_about_the_gold_rate_reproducibly(tmp_path):
    streams = []
    for seed in (0, 0, 1):
        directory = tmp_path / f"run{len(streams)}"
        directory.mkdir()
        store = new_store(directory, 200, gold=200, overlap=1, gold_rate=0.25, seed=seed)
        store.add_annotator("ann")
        store.add_annotator("bob")
        served = label_until_done(store, ["ann"])
        streams.append([(a.pair.id, a.left) for a in served])
        checks = [a for a in served if a.is_check]
        assert all(a.pair.gold == "a" for a in checks) and len(served) - len(checks) == 200
        assert 0.18 < len(checks) / len(served) < 0.32  # binomial sd ≈ 0.03 over ~270 draws
        assert 0.4 < sum(a.left == "a" for a in served) / len(served) < 0.6
        bob = store.next_assignment("bob")  # ann took every regular pair; checks do not make bob wait
        assert bob is None
    assert streams[0] == streams[1] and streams[0] != streams[2]


def test_checks_go_to_everyone_and_do_not_count_toward_overlap(tmp_path):
    store = new_store(tmp_path, 40, gold=2, overlap=1, gold_rate=0.5)
    for name in ("ann", "bob"):
        store.add_annotator(name)
    served = label_until_done(store, ["ann", "bob"])
    checks = Counter((a.annotator, a.pair.id) for a in served if a.is_check)
    assert set(checks) == {(name, pair) for name in ("ann", "bob") for pair in ("g0", "g1")}
    assert len(served) == 40 + 4


def test_skip_is_not_served_again_and_holds_no_slot(tmp_path):
    store = new_store(tmp_path, 1, overlap=1)
    for name in ("ann", "bob"):
        store.add_annotator(name)
    first = store.next_assignment("ann")
    store.skip("ann", first.id)
    store.skip("ann", first.id)  # twice: harmless
    assert store.next_assignment("ann") is None
    assert store.progress("ann") == Progress(done=0, skipped=1, remaining=0)
    with pytest.raises(LookupError, match="skipped"):
        store.record_label("ann", first.id, "a", None, "")
    taken = store.next_assignment("bob")
    assert taken.pair.id == "r0"
    assert store.record_label("bob", taken.id, "b", 2, "clear")
    with pytest.raises(LookupError, match="labelled already"):
        store.skip("bob", taken.id)


def test_open_assignment_is_served_again_after_a_restart(tmp_path):
    store = new_store(tmp_path, 5, overlap=2, seed=3)
    store.add_annotator("ann")
    first = store.next_assignment("ann")
    store.close()
    pairs = tmp_path / "pairs.jsonl"
    again = Store.create_or_open(tmp_path / "labels.db", pairs, 2, 0.0, 3, str(pairs)).next_assignment("ann")
    assert (again.id, again.pair, again.left, again.is_check) == (first.id, first.pair, first.left, first.is_check)


def test_an_expired_lease_frees_the_pair(tmp_path):
    store = new_store(tmp_path, 1, overlap=1)
    for name in ("ann", "bob"):
        store.add_annotator(name)
    start = 1_000_000.0
    store.now = lambda: start
    held = store.next_assignment("ann")
    assert store.next_assignment("bob") is None
    assert store.progress("bob").remaining == 1  # held by ann's lease: it may come back to bob
    store.now = lambda: start + LEASE_SECONDS + 1
    freed = store.next_assignment("bob")
    assert freed.pair.id == held.pair.id
    assert store.next_assignment("ann").id == held.id  # still ann's own open assignment
    assert store.record_label("ann", held.id, "a", None, "")
    assert store.labels()[0].seconds == pytest.approx(0.0)  # served again at the same instant: timed from then


def test_record_label_is_idempotent_and_checked(tmp_path):
    store = new_store(tmp_path, 2, overlap=1)
    for name in ("ann", "bob"):
        store.add_annotator(name)
    times = iter([100.0, 107.5, 200.0])
    store.now = lambda: next(times)
    mine = store.next_assignment("ann")
    assert store.record_label("ann", mine.id, "b", 3, "much better") is True
    assert store.record_label("ann", mine.id, "a", None, "changed my mind") is False
    [label] = store.labels()
    assert (label.pair_id, label.annotator, label.choice, label.strength, label.comment) == (
        mine.pair.id, "ann", "b", 3, "much better")  # fmt: skip
    assert (label.seconds, label.labelled_at, label.left, label.is_check) == (7.5, 107.5, mine.left, False)
    with pytest.raises(LookupError):
        store.record_label("bob", mine.id, "a", None, "")
    with pytest.raises(LookupError):
        store.record_label("ann", 999, "a", None, "")
    for choice, strength in [("left", None), ("a", 4), ("a", True), ("tie", 1)]:
        with pytest.raises(ValueError):
            store.record_label("ann", mine.id, choice, strength, "")
    assert len(store.labels()) == 1


def test_two_stores_in_two_threads_lose_and_duplicate_nothing(tmp_path):
    store = new_store(tmp_path, 30, overlap=2)
    names = ["ann", "bob", "cy", "dee"]
    for name in names:
        store.add_annotator(name)
    other = Store.open(tmp_path / "labels.db")
    served: list[list] = [[], []]

    def work(index: int, own: Store, mine: list[str]) -> None:
        served[index] = label_until_done(own, mine)

    threads = [threading.Thread(target=work, args=(0, store, names[:2])),
               threading.Thread(target=work, args=(1, other, names[2:]))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    labels = store.labels()
    assert len(labels) == len(served[0]) + len(served[1]) == 60
    assert Counter(label.pair_id for label in labels) == {f"r{i}": 2 for i in range(30)}
    assert len({(label.pair_id, label.annotator) for label in labels}) == 60

    # the same post twice at once, through both stores: one label
    (tmp_path / "x").mkdir()
    extra = new_store(tmp_path / "x", 1)
    extra.add_annotator("ann")
    twin = Store.open(tmp_path / "x" / "labels.db")
    assignment = extra.next_assignment("ann")
    results, barrier = [], threading.Barrier(2)

    def post(own: Store) -> None:
        barrier.wait()
        results.append(own.record_label("ann", assignment.id, "a", None, ""))

    posts = [threading.Thread(target=post, args=(own,)) for own in (extra, twin)]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join()
    assert sorted(results) == [False, True] and len(extra.labels()) == 1
