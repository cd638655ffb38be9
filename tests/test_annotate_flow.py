"""The whole human-preference path with the README's commands: an SFT model's pairs, labels from three people through
the server, the audit of their labels, and a reward model and DPO trained on the export."""

from __future__ import annotations

import json
import random
import urllib.request

import pytest

from conftest import annotate_server, qa_rows, write_jsonl
from posttrain.cli import main

ADMIN = "flow-test-admin-token"
PEOPLE = ("ana", "ben", "cat")


def call(url: str, body: dict | None = None) -> dict:
    """GET (or POST ``body`` as JSON) and read the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def label_everything(url: str, token: str, seed: int) -> int:
    """One person labels until nothing is left: mostly A or B, sometimes a tie. Returns how many labels."""
    rng, n = random.Random(seed), 0
    while (shown := call(f"{url}/api/a/{token}/next"))["assignment"] is not None:
        choice = rng.choice(["left", "right", "left", "right", "tie"])
        body = {"assignment": shown["assignment"], "choice": choice, "strength": None, "comment": ""}
        assert call(f"{url}/api/a/{token}/label", body) == {"recorded": True}
        n += 1
    return n


@pytest.mark.slow
def test_sft_model_to_pairs_to_labels_to_audit_to_rm_and_dpo(tiny_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in qa_rows(6)])
    pairs, db = tmp_path / "pairs.jsonl", tmp_path / "labels.sqlite"
    argv = ["annotate", "sample", "--model", str(tiny_model), "--prompts", str(prompts), "--per-prompt", "2",
            "--output", str(pairs), "--max-new-tokens", "12"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for row in rows[::4]:  # some known answers, as a user marks checks by hand
        row["gold"] = "a"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()

    with annotate_server(pairs, db, ADMIN, "--overlap", "3", "--gold-rate", "0.2") as url:
        tokens = []
        for name in PEOPLE:
            assert main(["annotate", "add-annotator", name, "--db", str(db), "--url", url]) == 0
            tokens.append(capsys.readouterr().out.strip().rsplit("/", 1)[1])
        labelled = [label_everything(url, token, seed) for seed, token in enumerate(tokens)]
    regular = sum("gold" not in row for row in rows)
    assert min(labelled) >= regular  # everyone labelled every regular pair (overlap 3 of 3 people), checks too

    per_label, prefs = tmp_path / "labels.jsonl", tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(db), "--output", str(per_label), "--aggregate", "all"]) == 0
    assert main(["annotate", "export", "--db", str(db), "--output", str(prefs), "--aggregate", "reliability"]) == 0
    assert main(["audit", "--data", str(per_label), "--output", str(tmp_path / "audit")]) == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["counts"]["annotators"] == 3 and audit["counts"]["rows_with_position"] == audit["counts"]["rows"]
    assert audit["agreement"]["krippendorff"]["n_pairs"] >= 5  # pairs with 2+ labels: the statistic is computed
    assert audit["reliability"]["gold"]["available"]

    common = ["--model", str(tiny_model), "--data", str(prefs), "--max-steps", "2", "--batch-size", "2",
              "--save-steps", "0"]  # fmt: skip
    assert main(["rm", *common, "--output", str(tmp_path / "rm")]) == 0
    assert main(["dpo", *common, "--output", str(tmp_path / "dpo")]) == 0
    assert (tmp_path / "rm" / "config.yaml").is_file() and (tmp_path / "dpo" / "config.yaml").is_file()
