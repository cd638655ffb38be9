"""Writes the walk-through's data: training prompts, held-out prompts and the evaluation set.

python examples/capitals/make_data.py   # -> prompts.jsonl, held_out.jsonl, eval.jsonl beside this file
"""

import json
import random
from pathlib import Path

from rewards import CAPITALS, IMAGINARY

HERE = Path(__file__).parent


def question(country: str) -> str:
    return f"What is the capital of {country}?"


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    countries = sorted(CAPITALS)
    random.Random(0).shuffle(countries)
    train, held_out = countries[:64], countries[64:]
    write("prompts.jsonl", [{"prompt": [{"role": "user", "content": question(c)}]} for c in train])
    write("held_out.jsonl", [{"prompt": [{"role": "user", "content": question(c)}]} for c in held_out])
    answerable = [{"prompt": [{"role": "user", "content": question(c)}], "answer": CAPITALS[c]} for c in held_out]
    unanswerable = [{"prompt": [{"role": "user", "content": question(c)}], "unanswerable": True} for c in IMAGINARY]
    write("eval.jsonl", answerable + unanswerable)


if __name__ == "__main__":
    main()
