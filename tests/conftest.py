"""Shared fixtures: a tiny Llama and BPE tokenizer built here (never downloaded), data files, and a
``posttrain annotate serve`` running on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain.models.factory import build_llama, train_tokenizer

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "a",
    "mat",
    "rug",
    "red",
    "blue",
    "big",
    "small",
    "what",
    "is",
    "colour",
    "of",
    "sky",
    "grass",
    "yes",
    "no",
]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def qa_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """Learnable prompt-completion pairs: the answer repeats the prompt's last word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        prompt, completion = "say " + " ".join(words), " " + words[-1]
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion.strip()}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model(directory: Path, pad_is_eos: bool = False, seed: int = 0) -> Path:
    tokenizer = train_tokenizer(corpus(), vocab_size=300, pad_is_eos=pad_is_eos)
    model = build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden 32) with a 300-token BPE tokenizer and a ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_pad_eos(tmp_path_factory) -> Path:
    """The same, but the tokenizer's pad token is its EOS token."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-pad-eos"), pad_is_eos=True)


def preference_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """Learnable pairs: both answers share their words, the chosen one ends in "yes", the rejected in "no"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "say " + " ".join(rng.choice(WORDS) for _ in range(3))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        chosen, rejected = f"{words} yes", f"{words} no"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    """Until ``url`` answers 200; fails when the server exits or takes longer than ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited: {server.stderr.read()}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise AssertionError(f"the server did not answer within {seconds} s")


@contextlib.contextmanager
def annotate_server(pairs: Path, db: Path, admin: str, *options: str) -> Iterator[str]:
    """``posttrain annotate serve`` as the CLI runs it, in a subprocess on a free loopback port; yields its
    base URL once the dashboard answers, and stops it by its pid afterwards (only the process started here)."""
    port = free_port()
    command = [sys.executable, "-m", "posttrain", "annotate", "serve", "--pairs", str(pairs), "--db", str(db),
               "--port", str(port), "--admin-token", admin, *options]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/admin/{admin}", server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
