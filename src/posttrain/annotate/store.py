"""The annotate store: pairs, annotators, assignments and labels in one SQLite file.

SQLite in WAL mode (readers never block the one writer) and a 10 s busy timeout; every write is
one ``BEGIN IMMEDIATE`` transaction, so two server threads (or processes) never hand out the same
slot. Labels, annotators and skips commit with ``synchronous=FULL``: the WAL is flushed to disk
before ``record_label`` returns, so a label survives a killed process and a power cut. Handing out
an assignment commits with ``synchronous=NORMAL`` (no flush; a killed process still loses nothing,
as the WAL is written before the commit returns): after a power cut an annotator at most gets a
new pair instead of the one shown, and it halves the flushes per label.
Each thread gets its own connection: the web server calls the store from a thread pool.

Assignment rule (``next_assignment``):
  1. An annotator's open assignment is served again (same pair, same left side): a reload or a
     restart of the server shows the same page. Serving it again renews its lease and restarts
     its clock (``Label.seconds`` counts from the last showing).
  2. Otherwise, when no regular pair (one without ``gold``) is left for the annotator, they are
     finished (None), even if known-answer checks remain. A regular pair is left for them when
     they have never been served it (labelled, skipped or open) and it holds fewer than
     ``overlap`` slots: labels plus open assignments younger than the lease (30 min). An older
     open assignment no longer holds its slot, so a person who walked away does not block a pair.
  3. With probability ``gold_rate`` the next assignment is a check (a draw from a hash of (seed,
     annotator, number served so far), so each annotator's stream is reproducible): the first pair
     with ``gold`` the annotator has not been served, in the seeded rank order. Checks may go to
     any number of annotators and never count toward overlap.
  4. Else the regular pair open to them with the fewest labels, ties broken by a seeded rank (a hash
     of (seed, pair id)): a pair is completed before fresh ones are started, so agreement can be
     measured early, and an index on (labels, rank) finds the pair after a few rows whatever the
     size of the file (a label costs the same with 20 pairs or 200,000).
  5. The left side is a seeded coin per assignment, (seed, annotator, number served so far), stored.
Skipping closes an assignment without a label: the pair is not served to that person again and
the skip holds no slot. Given the seed and the order of the requests, everything is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.annotate.pairs import PairRecord, file_sha256, read_pairs
from posttrain.errors import UserError

__all__ = ["Annotator", "Assignment", "Label", "PairRecord", "Progress", "Store"]

FORMAT = "posttrain-annotate-1"  # meta 'format': marks a file as an annotate database
LEASE_SECONDS = 30 * 60
BUSY_TIMEOUT_SECONDS = 10.0
CHOICES = ("a", "b", "tie", "both_bad")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- format, settings, the pairs file's SHA-256
CREATE TABLE pairs (
    row INTEGER PRIMARY KEY,  -- 1-based row of the pairs file
    id TEXT NOT NULL UNIQUE, prompt TEXT NOT NULL,  -- prompt: JSON, a string or a list of messages
    response_a TEXT NOT NULL, response_b TEXT NOT NULL, gold TEXT CHECK (gold IN ('a', 'b')),
    rank REAL NOT NULL,  -- the seeded order in which pairs with as many labels are served
    labelled INTEGER NOT NULL DEFAULT 0);  -- labels given, kept with each label
CREATE INDEX pairs_queue ON pairs (labelled, rank) WHERE gold IS NULL;
CREATE INDEX pairs_checks ON pairs (rank) WHERE gold IS NOT NULL;
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,  -- the secret token itself is never stored
    created_at REAL NOT NULL);
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY,
    annotator INTEGER NOT NULL REFERENCES annotators (id), pair INTEGER NOT NULL REFERENCES pairs (row),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')), served_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'labelled', 'skipped')), is_check INTEGER NOT NULL,
    UNIQUE (annotator, pair));  -- nobody is served a pair twice
CREATE INDEX assignments_by_pair ON assignments (pair, state);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,  -- labelling order
    assignment INTEGER NOT NULL UNIQUE REFERENCES assignments (id),
    pair INTEGER NOT NULL REFERENCES pairs (row), annotator INTEGER NOT NULL REFERENCES annotators (id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    strength INTEGER CHECK (strength IN (1, 2, 3)), comment TEXT NOT NULL,
    seconds REAL NOT NULL, labelled_at REAL NOT NULL,
    UNIQUE (pair, annotator));
"""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str


@dataclass(frozen=True)
class Assignment:
    """One pair served to one annotator."""

    id: int
    annotator: str  # name
    pair: PairRecord
    left: str  # "a" or "b": which response is shown on the left
    served_at: float  # unix time
    is_check: bool  # a known-answer pair mixed in at gold_rate


@dataclass(frozen=True)
class Label:
    pair_id: str
    annotator: str
    choice: str  # "a", "b", "tie" or "both_bad", in terms of response_a / response_b (not left / right)
    left: str  # "a" or "b" shown on the left
    strength: int | None  # 1 slightly, 2 clearly, 3 much better; None
    comment: str
    seconds: float  # labelled_at − served_at
    labelled_at: float
    is_check: bool


@dataclass(frozen=True)
class Progress:
    done: int  # labels given by this annotator
    skipped: int
    remaining: int  # pairs this annotator could still be served (0 when finished)


def draw(*parts: object) -> float:
    """A uniform number in [0, 1) from a SHA-256 of ``parts``: the same parts give the same number
    on every machine and run (Python's own ``hash`` is salted per process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_settings(overlap: int, gold_rate: float, pairs: list[PairRecord], shown: str) -> None:
    """--overlap at least 1; --gold-rate in [0, 1), and 0 when no pair has gold; some pair without gold."""
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {overlap}")
    if not (math.isfinite(gold_rate) and 0.0 <= gold_rate < 1.0):
        raise UserError(f"--gold-rate must be in [0, 1), got {gold_rate}")
    if gold_rate > 0 and not any(p.gold for p in pairs):
        raise UserError(f"--gold-rate {gold_rate}: no pair of {shown} has 'gold', so there are no checks")
    if all(p.gold for p in pairs):
        raise UserError(f"{shown}: every pair has 'gold': there are checks but nothing to label")


class _PerThread(threading.local):
    """Each thread's own sqlite3 connection (None until the thread first needs one)."""

    def __init__(self) -> None:
        self.connection: sqlite3.Connection | None = None


class Store:
    """The labelling database; see the module docstring for the assignment rule."""

    def __init__(self, db: Path, shown: str) -> None:
        self.db, self.shown = db, shown
        self.lease = LEASE_SECONDS
        self.now = time.time  # the clock; tests replace it
        self._local = _PerThread()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_turn = threading.Lock()  # one writing thread at a time (see ``_write``)
        self.meta = meta = dict(self._conn().execute("SELECT key, value FROM meta"))
        self.overlap, self.gold_rate, self.seed = int(meta["overlap"]), float(meta["gold_rate"]), int(meta["seed"])
        rows = self._conn().execute("SELECT row, id, prompt, response_a, response_b, gold FROM pairs ORDER BY row")
        self._pairs = {row: PairRecord(i, json.loads(p), a, b, g) for row, i, p, a, b, g in rows}

    @classmethod
    def create_or_open(
        cls, db: Path, pairs_file: Path, overlap: int, gold_rate: float, seed: int, shown_path: str
    ) -> Store:
        """A new database from the pairs file (validated in full before anything is created), or the
        existing one when it was built from the same file with the same settings."""
        db, pairs_file = Path(db), Path(pairs_file)
        if db.exists() and pairs_file.exists() and db.samefile(pairs_file):
            raise UserError(f"{db}: is the pairs file {shown_path}; give the database another name")
        if db.exists():
            store = cls.open(db)
            store._check_same_inputs(pairs_file, shown_path, overlap, gold_rate, seed)
            return store
        pairs, sha256 = read_pairs(pairs_file, shown_path)
        check_settings(overlap, gold_rate, pairs, shown_path)
        if not db.parent.is_dir():
            raise UserError(f"{db}: the directory {db.parent} does not exist")
        meta = {"format": FORMAT, "overlap": overlap, "gold_rate": repr(float(gold_rate)), "seed": seed,
                "pairs_sha256": sha256, "pairs_file": shown_path, "created_at": time.time()}  # fmt: skip
        _build(db, pairs, meta)
        return cls(db, str(db))

    @classmethod
    def open(cls, db: Path) -> Store:
        """An existing annotate database; UserError when it is missing or is something else."""
        db, shown = Path(db), str(db)
        if not db.is_file():
            raise UserError(f"{shown}: file not found")
        connection = sqlite3.connect(db)
        try:
            found = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError:  # not SQLite at all, or SQLite without our meta table
            found = None
        finally:
            connection.close()
        if found != (FORMAT,):
            raise UserError(f"{shown}: not a posttrain annotate database")
        return cls(db, shown)

    def _check_same_inputs(self, pairs_file: Path, shown: str, overlap: int, gold_rate: float, seed: int) -> None:
        if not pairs_file.is_file():
            raise UserError(f"{shown}: file not found")
        if file_sha256(pairs_file) != self.meta["pairs_sha256"]:
            raise UserError(f"{self.shown}: built from another pairs file ({shown} differs)")
        for flag, given, stored in (("--overlap", overlap, self.overlap), ("--gold-rate", gold_rate, self.gold_rate),
                                    ("--seed", seed, self.seed)):  # fmt: skip
            if given != stored:
                raise UserError(f"{flag} {given} differs from {stored} stored in {self.shown}")

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared across threads)."""
        connection = self._local.connection
        if connection is None:
            connection = sqlite3.connect(self.db, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                         check_same_thread=False)  # fmt: skip
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """One transaction: committed on success, rolled back on any exception."""
        connection = self._conn()
        connection.execute(begin)
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock at once, so what it reads stays true.
        ``flush``: the commit waits for the WAL to be on disk (synchronous=FULL), else NORMAL.

        The threads of one process take turns on a Python lock first, which wakes the next one as soon as
        a write ends: SQLite's busy handler waits for a held write lock by sleeping in steps of up to
        100 ms, far longer than the few milliseconds a write holds it. Other processes (an
        ``add-annotator`` beside the server) still meet SQLite's busy timeout."""
        connection = self._conn()
        with self._write_turn:
            connection.execute(f"PRAGMA synchronous={'FULL' if flush else 'NORMAL'}")
            with self._transaction("BEGIN IMMEDIATE") as db:
                yield db

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot (WAL readers do not wait for the writer)."""
        return self._transaction("BEGIN")

    def close(self) -> None:
        """Close every connection this Store opened (call when no other thread uses it)."""
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = _PerThread()

    def add_annotator(self, name: str) -> str:
        """Register ``name``; returns their secret token (only its SHA-256 is stored)."""
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"annotator name {name!r}: use 1 to 64 letters, digits, '.', '_', '@' or '-', "
                            "starting with a letter or digit")  # fmt: skip
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            if db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise UserError(f"annotator {name!r} exists already in {self.shown}")
            db.execute("INSERT INTO annotators (name, token_sha256, created_at) VALUES (?, ?, ?)",
                       (name, _token_hash(token), self.now()))  # fmt: skip
        return token

    def annotator_by_token(self, token: str) -> Annotator | None:
        found = self._conn().execute("SELECT id, name FROM annotators WHERE token_sha256 = ?", (_token_hash(token),))
        row = found.fetchone()
        return None if row is None else Annotator(*row)

    def annotators(self) -> list[Annotator]:
        return [Annotator(*row) for row in self._conn().execute("SELECT id, name FROM annotators ORDER BY id")]

    def _annotator_id(self, db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LookupError(f"no annotator {name!r} in {self.shown}")
        return row[0]

    def next_assignment(self, annotator: str) -> Assignment | None:
        """The annotator's open assignment, else a new one by the rule of the module docstring; None when
        no regular pair is left for them."""
        with self._write(flush=False) as db:
            who, now = self._annotator_id(db, annotator), self.now()
            row = db.execute("SELECT id, pair, left_side, is_check FROM assignments WHERE annotator = ? AND "
                             "state = 'open'", (who,)).fetchone()  # fmt: skip
            if row is not None:
                db.execute("UPDATE assignments SET served_at = ? WHERE id = ?", (now, row[0]))
                return Assignment(row[0], annotator, self._pairs[row[1]], row[2], now, bool(row[3]))
            regular = self._next_regular(db, who, now)
            if regular is None:
                return None
            served = db.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (who,)).fetchone()[0]
            check = None
            if draw(self.seed, annotator, served, "check") < self.gold_rate:
                check = self._next_check(db, who)
            pair = regular if check is None else check
            left = "a" if draw(self.seed, annotator, served, "left") < 0.5 else "b"
            is_check = check is not None
            cursor = db.execute("INSERT INTO assignments (annotator, pair, left_side, served_at, state, is_check) "
                                "VALUES (?, ?, ?, ?, 'open', ?)", (who, pair, left, now, is_check))  # fmt: skip
            return Assignment(cursor.lastrowid, annotator, self._pairs[pair], left, now, is_check)

    # A regular pair is open to ``who`` when it holds fewer than ``overlap`` slots (labels + open
    # assignments younger than the lease) and ``who`` was never served it. The queue index walks the
    # pairs by (labels, rank), so the first open pair is found after a few rows, not a scan.
    _OPEN_TO = """
        FROM pairs AS p INDEXED BY pairs_queue
        WHERE p.gold IS NULL AND p.labelled < :overlap
          AND p.labelled + (SELECT COUNT(*) FROM assignments AS s
                            WHERE s.pair = p.row AND s.state = 'open' AND s.served_at > :cutoff) < :overlap
          AND NOT EXISTS (SELECT 1 FROM assignments AS s WHERE s.annotator = :who AND s.pair = p.row)
    """

    def _next_regular(self, db: sqlite3.Connection, who: int, now: float) -> int | None:
        """The regular pair open to ``who`` with the fewest labels, ties by the seeded rank; None if none."""
        found = db.execute(f"SELECT p.row {self._OPEN_TO} ORDER BY p.labelled, p.rank LIMIT 1",
                           {"cutoff": now - self.lease, "overlap": self.overlap, "who": who}).fetchone()  # fmt: skip
        return None if found is None else found[0]

    def _next_check(self, db: sqlite3.Connection, who: int) -> int | None:
        """The first pair with gold, by the seeded rank, that ``who`` was never served; None if none."""
        found = db.execute("SELECT row FROM pairs INDEXED BY pairs_checks WHERE gold IS NOT NULL AND NOT EXISTS "
                           "(SELECT 1 FROM assignments AS s WHERE s.annotator = ? AND s.pair = pairs.row) "
                           "ORDER BY rank LIMIT 1", (who,)).fetchone()  # fmt: skip
        return None if found is None else found[0]

    def _own_assignment(self, db: sqlite3.Connection, annotator: str, assignment_id: int) -> tuple:
        """(annotator id, pair row, served_at, state) of the annotator's assignment; LookupError if not theirs."""
        row = db.execute(
            "SELECT s.annotator, s.pair, s.served_at, s.state FROM assignments AS s "
            "JOIN annotators AS a ON a.id = s.annotator WHERE s.id = ? AND a.name = ?",
            (assignment_id, annotator),
        ).fetchone()
        if row is None:
            raise LookupError(f"assignment {assignment_id} is not {annotator!r}'s")
        return row

    def assignment(self, annotator: str, assignment_id: int) -> Assignment:
        """The annotator's assignment (open, labelled or skipped), as served: the web app needs its left
        side to turn a left/right choice into a/b. LookupError when it is not theirs."""
        row = (
            self._conn()
            .execute(
                "SELECT s.pair, s.left_side, s.served_at, s.is_check FROM assignments AS s "
                "JOIN annotators AS a ON a.id = s.annotator WHERE s.id = ? AND a.name = ?",
                (assignment_id, annotator),
            )
            .fetchone()
        )
        if row is None:
            raise LookupError(f"assignment {assignment_id} is not {annotator!r}'s")
        return Assignment(assignment_id, annotator, self._pairs[row[0]], row[1], row[2], bool(row[3]))

    def record_label(self, annotator: str, assignment_id: int, choice: str, strength: int | None, comment: str) -> bool:
        """Store the label and close the assignment, committed before returning. True when recorded now,
        False when the assignment was labelled already (a repeated post). ValueError for a bad choice,
        strength (1, 2, 3 or None; None for tie and both_bad) or comment; LookupError when the assignment
        is not this annotator's or was skipped."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if strength is not None and (isinstance(strength, bool) or strength not in (1, 2, 3)):
            raise ValueError(f"strength must be 1, 2, 3 or None, got {strength!r}")
        if strength is not None and choice not in ("a", "b"):
            raise ValueError(f"strength says how much better the chosen answer is; {choice!r} chooses none")
        if not isinstance(comment, str):
            raise ValueError(f"comment must be a string, got {type(comment).__name__}")
        with self._write() as db:
            who, pair, served_at, state = self._own_assignment(db, annotator, assignment_id)
            if state == "labelled":
                return False
            if state == "skipped":
                raise LookupError(f"assignment {assignment_id} was skipped")
            now = self.now()
            db.execute(
                "INSERT INTO labels (assignment, pair, annotator, choice, strength, comment, seconds, labelled_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (assignment_id, pair, who, choice, strength, comment, now - served_at, now),
            )
            db.execute("UPDATE assignments SET state = 'labelled' WHERE id = ?", (assignment_id,))
            db.execute("UPDATE pairs SET labelled = labelled + 1 WHERE row = ?", (pair,))
        return True

    def skip(self, annotator: str, assignment_id: int) -> None:
        """Close the assignment without a label; the pair is not served to them again. Skipping twice is
        harmless; LookupError when the assignment is not theirs or was labelled."""
        with self._write() as db:
            state = self._own_assignment(db, annotator, assignment_id)[3]
            if state == "labelled":
                raise LookupError(f"assignment {assignment_id} was labelled already")
            db.execute("UPDATE assignments SET state = 'skipped' WHERE id = ?", (assignment_id,))

    def progress(self, annotator: str) -> Progress:
        """Labels given, skips, and the regular pairs not yet complete that they were not served (their
        open one included). Pairs that others hold open count as remaining: they may come back when a
        lease ends. Two index counts, whatever the size of the file."""
        with self._read() as db:
            who = self._annotator_id(db, annotator)
            counts = dict(db.execute("SELECT state, COUNT(*) FROM assignments WHERE annotator = ? GROUP BY state",
                                     (who,)))  # fmt: skip
            incomplete = db.execute("SELECT COUNT(*) FROM pairs INDEXED BY pairs_queue WHERE gold IS NULL "
                                    "AND labelled < ?", (self.overlap,)).fetchone()[0]  # fmt: skip
            theirs = db.execute("SELECT COUNT(*) FROM assignments AS s JOIN pairs AS p ON p.row = s.pair WHERE "
                                "s.annotator = ? AND s.state != 'open' AND p.gold IS NULL AND p.labelled < ?",
                                (who, self.overlap)).fetchone()[0]  # fmt: skip
            remaining = incomplete - theirs
        return Progress(counts.get("labelled", 0), counts.get("skipped", 0), remaining)

    def labels(self) -> list[Label]:
        """Every label, in labelling order."""
        rows = self._conn().execute(
            "SELECT l.pair, a.name, l.choice, s.left_side, l.strength, l.comment, l.seconds, l.labelled_at, "
            "s.is_check FROM labels AS l JOIN annotators AS a ON a.id = l.annotator "
            "JOIN assignments AS s ON s.id = l.assignment ORDER BY l.id"
        )
        return [Label(self._pairs[row[0]].id, *row[1:8], bool(row[8])) for row in rows]

    def pairs(self) -> list[PairRecord]:
        return list(self._pairs.values())

    def settings(self) -> dict:
        return {"overlap": self.overlap, "gold_rate": self.gold_rate, "seed": self.seed,
                "pairs_sha256": self.meta["pairs_sha256"], "pairs_file": self.meta["pairs_file"],
                "pairs": len(self._pairs)}  # fmt: skip


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _build(db: Path, pairs: list[PairRecord], meta: dict) -> None:
    """Write a new database beside ``db``, then move it into place: a failure leaves no half-built file."""
    staging = db.with_name(f".{db.name}.{os.getpid()}.new")
    staging.unlink(missing_ok=True)
    connection = sqlite3.connect(staging)
    try:
        with connection:
            connection.executescript(SCHEMA)
            connection.executemany("INSERT INTO meta VALUES (?, ?)", [(key, str(v)) for key, v in meta.items()])
            rows = [(row, p.id, json.dumps(p.prompt), p.response_a, p.response_b, p.gold, draw(meta["seed"], p.id))
                    for row, p in enumerate(pairs, start=1)]  # fmt: skip
            connection.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, 0)", rows)
        connection.close()
        os.replace(staging, db)
    finally:
        connection.close()
        staging.unlink(missing_ok=True)
