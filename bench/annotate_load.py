"""Load and durability of ``posttrain annotate serve``: many annotators labelling at once on loopback.

Starts the server in its own process on a free 127.0.0.1 port, adds the annotators, and runs one
client per annotator (asyncio + httpx, one process) that asks for its next pair and posts a label,
as fast as the server answers, for ``--seconds``. Every label the server confirmed is then looked
up in the database: nothing may be lost, duplicated, or recorded with another choice, and no pair
may hold more labels than the overlap. Prints the median and 95th-percentile latency of each
request kind and the label throughput.

With ``--kill-after S`` the server is killed with SIGKILL S seconds into the load, restarted on
the same database, and checked: every confirmed label is there, nothing that was never posted is,
and every annotator's queue resumes. With ``--browser`` a headless Chromium (Debian's ``chromium``
and ``chromium-driver``) loads an annotator's page during the load and reports the time until
the page is fully rendered (navigation timing: load event end).

    python bench/annotate_load.py [--annotators 20] [--seconds 60] [--pairs 20000] [--think 0]
                                  [--kill-after 20] [--browser]

``--think S`` makes each annotator arrive after a random 0 to 2·S seconds and wait as long between
labels (people take several seconds to read two answers); the default 0 is a stress test, every
client starting at once and posting as fast as the server answers, so latency is mostly time spent
queueing behind the other clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from posttrain.annotate.store import Store

ADMIN = "bench-admin-token"
CHOICES = ("left", "right", "left", "right", "tie", "both_bad")  # mostly a preference, sometimes not


@dataclass
class Tally:
    """What the clients saw: latencies per request kind (seconds), labels posted and labels confirmed,
    each as (annotator, pair id, choice in a/b terms)."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {"next": [], "label": []})
    posted: set[tuple[str, str, str]] = field(default_factory=set)
    confirmed: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def write_pairs(path: Path, n: int, gold_share: float, seed: int) -> dict[str, dict]:
    """n pairs of random words, a share with a known answer; the prompt names the pair id."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "romeo", "tango", "zulu"]
    rows = {}
    for i in range(n):
        row = {"id": str(i), "prompt": f"Question {i}: " + " ".join(rng.choices(words, k=12)),
               "response_a": " ".join(rng.choices(words, k=rng.randint(5, 60))),
               "response_b": " ".join(rng.choices(words, k=rng.randint(5, 60)))}  # fmt: skip
        if rng.random() < gold_share:
            row["gold"] = rng.choice("ab")
        rows[row["id"]] = row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(pairs: Path, db: Path, port: int, overlap: int, gold_rate: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "posttrain", "annotate", "serve", "--pairs", str(pairs), "--db", str(db),
               "--port", str(port), "--admin-token", ADMIN, "--overlap", str(overlap),
               "--gold-rate", str(gold_rate)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/admin/{ADMIN}", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not answer within 120 s")


def pair_of(prompt: str) -> str:
    return prompt.split(":", 1)[0].removeprefix("Question ")


async def annotate(
    client: httpx.AsyncClient, name: str, token: str, pairs: dict, until: float, tally: Tally, think: float
) -> None:
    """One annotator: next pair, a random choice, post it, wait ``think`` seconds on average; until the time is
    up, the queue is empty or the server is gone."""
    rng = random.Random(name)
    if think:  # people arrive over time, not all in the same millisecond
        await asyncio.sleep(rng.uniform(0, 2 * think))
    while time.monotonic() < until:
        try:
            start = time.perf_counter()
            shown = (await client.get(f"/api/a/{token}/next")).raise_for_status().json()
            tally.latency["next"].append(time.perf_counter() - start)
            if shown["assignment"] is None:
                return
            pair = pairs[pair_of(shown["prompt"])]
            left = "a" if shown["left"] == pair["response_a"] else "b"
            choice = rng.choice(CHOICES)
            stored = {"left": left, "right": "b" if left == "a" else "a"}.get(choice, choice)
            tally.posted.add((name, pair["id"], stored))
            start = time.perf_counter()
            body = {"assignment": shown["assignment"], "choice": choice, "strength": None, "comment": ""}
            answer = (await client.post(f"/api/a/{token}/label", json=body)).raise_for_status().json()
            tally.latency["label"].append(time.perf_counter() - start)
            if answer["recorded"]:
                tally.confirmed.append((name, pair["id"], stored))
        except httpx.HTTPError as err:
            tally.errors.append(f"{type(err).__name__}: {err}")
            return
        if think:  # a person reads and decides: on average ``think`` seconds per label
            await asyncio.sleep(rng.uniform(0, 2 * think))


async def load(port: int, tokens: dict[str, str], pairs: dict, seconds: float, tally: Tally, think: float) -> None:
    limits = httpx.Limits(max_connections=len(tokens) + 5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(*(annotate(client, n, t, pairs, until, tally, think) for n, t in tokens.items()))


def check(db: Path, tally: Tally, overlap: int, pairs: dict) -> dict:
    """The database against what the clients saw: confirmed ⊆ stored ⊆ posted, no repeats, overlap kept."""
    labels = Store.open(db).labels()
    stored = [(label.annotator, label.pair_id, label.choice) for label in labels]
    per_pair: dict[str, int] = {}
    for label in labels:
        if pairs[label.pair_id].get("gold") is None:
            per_pair[label.pair_id] = per_pair.get(label.pair_id, 0) + 1
    return {
        "stored": len(stored),
        "confirmed": len(tally.confirmed),
        "confirmed_missing": len(set(tally.confirmed) - set(stored)),
        "never_posted": len(set(stored) - tally.posted),
        "repeated": len(stored) - len({(a, p) for a, p, _ in stored}),
        "over_overlap": sum(count > overlap for count in per_pair.values()),
        "unconfirmed_stored": len(set(stored) - set(tally.confirmed)),
    }


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"n={len(values)}"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return (
        f"n={len(values):6d}  p50 {cuts[49] * 1e3:6.1f} ms  p95 {cuts[94] * 1e3:6.1f} ms  p99 {cuts[98] * 1e3:6.1f} ms"
    )


def browser_render_ms(port: int, token: str, times: int = 5) -> list[float]:
    """Milliseconds from navigation start to the end of the load event of an annotator's page, in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        measured = []
        for _ in range(times):
            driver.get(f"http://127.0.0.1:{port}/a/{token}")
            timing = driver.execute_script(
                "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd;"
            )
            measured.append(float(timing))
        return measured
    finally:
        driver.quit()


FAULTS = ("confirmed_missing", "never_posted", "repeated", "over_overlap", "no_label_after_restart")


def run_load(args, workdir: Path) -> bool:
    """The load (and the kill and restart); True when the database holds exactly what it must."""
    pairs_file, db = workdir / "pairs.jsonl", workdir / "labels.sqlite"
    pairs = write_pairs(pairs_file, args.pairs, 0.05, args.seed)
    port = free_port()
    server = start_server(pairs_file, db, port, args.overlap, args.gold_rate)
    store = Store.open(db)
    tokens = {f"annotator-{i:02d}": store.add_annotator(f"annotator-{i:02d}") for i in range(args.annotators)}
    tally = Tally()
    print(f"{args.annotators} annotators, {args.pairs} pairs, overlap {args.overlap}, gold rate {args.gold_rate}, "
          f"think time {args.think} s")  # fmt: skip
    started = time.monotonic()
    seconds = args.seconds
    if args.kill_after:  # in the middle of the load: requests in flight, clients see the connection drop
        threading.Timer(args.kill_after, os.kill, (server.pid, signal.SIGKILL)).start()
    if args.browser:
        renders: list[float] = []

        async def with_browser() -> None:
            others = dict(list(tokens.items())[1:])
            task = asyncio.create_task(load(port, others, pairs, seconds, tally, args.think))
            await asyncio.sleep(min(5.0, seconds / 3))
            renders.extend(await asyncio.to_thread(browser_render_ms, port, next(iter(tokens.values()))))
            await task

        asyncio.run(with_browser())
    else:
        asyncio.run(load(port, tokens, pairs, seconds, tally, args.think))
    elapsed = time.monotonic() - started
    if not args.kill_after:
        server.send_signal(signal.SIGINT)
    server.wait(timeout=60)
    if args.kill_after:
        print(f"killed the server with SIGKILL {args.kill_after:.0f} s into the load (exit status {server.returncode})")
    print(f"GET  next : {percentiles(tally.latency['next'])}")
    print(f"POST label: {percentiles(tally.latency['label'])}")
    print(f"labels confirmed: {len(tally.confirmed)} in {elapsed:.1f} s ({len(tally.confirmed) / elapsed:.0f}/s); "
          f"client errors: {len(tally.errors)} {sorted(set(tally.errors))[:3]}")  # fmt: skip
    if args.browser:
        print(f"annotator page in Chromium, load event end (ms): {', '.join(f'{r:.0f}' for r in renders)}")
    verdict = check(db, tally, args.overlap, pairs)
    print("database check:", json.dumps(verdict))
    faults = [{**verdict, "no_label_after_restart": False}]
    if args.kill_after:
        faults.append(resume(args, pairs_file, db, tokens, pairs, tally))
    return all(not f[key] for f in faults for key in FAULTS)


def resume(args, pairs_file: Path, db: Path, tokens: dict[str, str], pairs: dict, tally: Tally) -> dict:
    """After SIGKILL: restart on the same database; every queue must serve again and the labels stay exact."""
    port = free_port()
    server = start_server(pairs_file, db, port, args.overlap, args.gold_rate)
    before = len(tally.confirmed)
    asyncio.run(load(port, tokens, pairs, 5.0, tally, args.think))
    server.send_signal(signal.SIGINT)
    server.wait(timeout=60)
    resumed = len(tally.confirmed) - before
    print(f"after the restart: {resumed} more labels confirmed in 5 s")
    verdict = check(db, tally, args.overlap, pairs)
    print("database check after the restart:", json.dumps(verdict))
    return {**verdict, "no_label_after_restart": resumed == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--gold-rate", type=float, default=0.1)
    parser.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="mean seconds between an annotator's labels (default 0: as fast as the server answers)",
    )
    parser.add_argument("--kill-after", type=float, default=0.0, help="SIGKILL the server after this many seconds")
    parser.add_argument("--browser", action="store_true", help="time an annotator's page in headless Chromium")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        exact = run_load(args, Path(workdir))
    print("the database holds exactly the confirmed labels" if exact else "FAULT: see the database checks above")
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
