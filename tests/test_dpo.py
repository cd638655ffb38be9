"""``posttrain dpo``: learns held-out preferences, is invariant to padding, caches the reference exactly."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import preference_rows, write_jsonl
from posttrain.cli import main
from posttrain.data.formats import detect_format
from posttrain.data.preference import split_implicit_prompt
from posttrain.models.loading import load_tokenizer
from posttrain.models.reference import Reference, cache_path, data_fingerprint, with_reference_logps
from posttrain.ops.preference import PAIRED_LOSSES, UNPAIRED_LOSSES
from posttrain.stages.dpo import DPOConfig, LossName, paired_loss, prepare

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def metrics(output: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/loss" in r]


def dpo(tiny_model: Path, data: Path, output: Path, *extra: str) -> int:
    args = ["dpo", "--model", str(tiny_model), "--data", str(data), "--output", str(output), "--seed", "3"]
    return main([*args, *extra])


def pair_data(tiny_model: Path, tmp_path: Path, rows: list[dict], **overrides) -> tuple[DPOConfig, object]:
    config = DPOConfig(model=str(tiny_model), data=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), output="-")
    for key, value in overrides.items():
        setattr(config, key, value)
    source = datasets.load_dataset("json", data_files=config.data, split="train")
    return config, prepare(source, config.data, load_tokenizer(str(tiny_model)), config)


def test_the_cli_loss_names_are_the_registry():
    assert set(typing.get_args(LossName)) == set(PAIRED_LOSSES) | set(UNPAIRED_LOSSES)


@pytest.mark.parametrize("conversational", [False, True])
def test_dpo_learns_held_out_preferences(tiny_model, tmp_path, conversational):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(400, conversational=conversational))
    code = dpo(tiny_model, data, tmp_path / "out", "--loss", "sigmoid", "--beta", "0.1", "--max-steps", "40",
               "--learning-rate", "1e-3", "--batch-size", "8", "--eval-split", "0.2", "--eval-steps", "20",
               "--logging-steps", "10")  # fmt: skip
    assert code == 0
    train, evals = metrics(tmp_path / "out")
    assert train[-1]["loss"] < train[0]["loss"] < 0.7  # starts near ln 2
    assert evals[-1]["eval/rewards/accuracies"] > 0.9
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    names |= {"logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected"}
    assert names <= set(train[-1]) and {f"eval/{n}" for n in names} <= set(evals[-1])
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo", "hinge", "simpo", "orpo"])
def test_every_paired_loss_trains(tiny_model, tmp_path, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(128))
    extra = ["--label-smoothing", "0.1"] if loss in ("cdpo", "robust") else []
    extra += ["--beta", "2.0"] if loss == "simpo" else []
    assert dpo(tiny_model, data, tmp_path / "out", "--loss", loss, "--max-steps", "16", "--learning-rate", "1e-3",
               "--logging-steps", "8", "--rpo-alpha", "0.5", *extra) == 0  # fmt: skip
    train, _ = metrics(tmp_path / "out")
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]


def test_kto_on_unpaired_data_with_lora_reference(tiny_model, tmp_path):
    rows = [
        {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
        for r in preference_rows(128)
        for key in ("chosen", "rejected")
    ]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    assert dpo(tiny_model, data, tmp_path / "out", "--loss", "kto", "--max-steps", "16", "--learning-rate", "1e-2",
               "--lora-r", "8", "--logging-steps", "8") == 0  # fmt: skip
    train, _ = metrics(tmp_path / "out")
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_padding_does_not_change_a_pair_loss(tiny_model, tmp_path):
    rows = preference_rows(2)
    rows[1]["chosen"] += " big" * 20  # forces 20+ pad tokens onto the first pair
    config, data = pair_data(tiny_model, tmp_path, rows, group_by_length=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = Reference(AutoModelForCausalLM.from_pretrained(tiny_model))
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01 * torch.randn_like(model.model.embed_tokens.weight))
        alone = paired_loss(model, data.collate(data.dataset[[0]]), reference, config).loss_sum
        both = paired_loss(model, data.collate(data.dataset[[0, 1]]), reference, config).loss_sum
        second = paired_loss(model, data.collate(data.dataset[[1]]), reference, config).loss_sum
    assert data.collate(data.dataset[[0, 1]])["attention_mask"][0].eq(0).sum() >= 20
    assert abs(alone.item() - (both - second).item()) < 1e-6
    assert abs(alone.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4  # the policy differs from the reference


def test_reference_cache_is_reused_and_never_stale(tiny_model, tmp_path, monkeypatch):
    _, data = pair_data(tiny_model, tmp_path, preference_rows(12))
    reference = Reference(AutoModelForCausalLM.from_pretrained(tiny_model).eval())
    cache = str(tmp_path / "cache")

    def cached(dataset, ref):
        return with_reference_logps(dataset, data.collate, ref, PAIR_COLUMNS, 4, cache, "cpu")

    first = cached(data.dataset, reference)
    files = list((tmp_path / "cache" / "ref-logps").iterdir())
    assert len(files) == 1
    live = reference.logps(data.collate(data.dataset[:4]))  # chosen 0..3 then rejected 0..3
    cached_batch = data.collate(first[:4])["ref_logps"]
    torch.testing.assert_close(cached_batch, live, atol=1e-5, rtol=0)

    calls = []
    monkeypatch.setattr("posttrain.models.reference.precompute_logps", lambda *a: calls.append(a))
    again = cached(data.dataset, reference)  # same data, same model: read from disk, nothing computed
    assert calls == [] and again["ref_logps"] == first["ref_logps"]
    monkeypatch.undo()

    changed_data = data.dataset.map(lambda e, i: {"chosen_ids": e["chosen_ids"][:-1] if i == 5 else e["chosen_ids"]},
                                    with_indices=True)  # fmt: skip
    cached(changed_data, reference)
    with torch.no_grad():
        reference.model.lm_head.weight[0, 0] += 1e-3  # tied: the embeddings change too
    cached(data.dataset, reference)
    assert len(list((tmp_path / "cache" / "ref-logps").iterdir())) == 3
    assert cache_path(cache, data_fingerprint(changed_data, PAIR_COLUMNS), "x") != cache_path(
        cache, data_fingerprint(data.dataset, PAIR_COLUMNS), "x"
    )


def test_precompute_ref_run_matches_live_reference_run(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(64))
    common = ["--max-steps", "6", "--learning-rate", "1e-3", "--logging-steps", "2", "--cache-dir", str(tmp_path / "c")]
    assert dpo(tiny_model, data, tmp_path / "live", *common) == 0
    assert dpo(tiny_model, data, tmp_path / "cached", *common, "--precompute-ref") == 0
    live, cached = metrics(tmp_path / "live")[0], metrics(tmp_path / "cached")[0]
    for a, b in zip(live, cached, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5


def test_implicit_prompt_is_the_shared_prefix():
    assert split_implicit_prompt("Q: sky? A: blue", "Q: sky? A: green") == ("Q: sky? A: ", "blue", "green")
    user = {"role": "user", "content": "sky?"}
    chosen = [user, {"role": "assistant", "content": "blue"}]
    rejected = [user, {"role": "assistant", "content": "green"}]
    assert split_implicit_prompt(chosen, rejected) == ([user], chosen[1:], rejected[1:])


def test_implicit_prompt_rows_train(tiny_model, tmp_path):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in preference_rows(64)]
    source = datasets.Dataset.from_list(rows)
    assert detect_format(source, "x").columns == ("chosen", "rejected")
    assert dpo(tiny_model, write_jsonl(tmp_path / "implicit.jsonl", rows), tmp_path / "out", "--max-steps", "4") == 0


def bad(tiny_model, tmp_path, capsys, rows, *extra) -> str:
    code = dpo(tiny_model, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "out", *extra)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not (tmp_path / "out").exists(), err
    return err


def test_bad_preference_input_gives_one_line(tiny_model, tmp_path, capsys):
    pairs = preference_rows(16)
    assert "(missing column 'rejected')" in bad(tiny_model, tmp_path, capsys, [{"prompt": "a", "chosen": "b"}] * 16)
    unpaired = [{"prompt": "a", "completion": "b", "label": True}] * 16
    assert "dpo --loss sigmoid needs preference data" in bad(tiny_model, tmp_path, capsys, unpaired)
    assert "needs unpaired_preference data" in bad(tiny_model, tmp_path, capsys, pairs, "--loss", "kto")
    assert "--beta must be positive" in bad(tiny_model, tmp_path, capsys, pairs, "--beta", "0")
    out_of_range = bad(tiny_model, tmp_path, capsys, pairs, "--loss", "robust", "--label-smoothing", "0.5")
    assert "--label-smoothing for robust must be in [0, 0.5)" in out_of_range
    missing_ref = bad(tiny_model, tmp_path, capsys, pairs, "--ref", str(tmp_path / "no-such-model"))
    assert "--ref " in missing_ref and "directory not found" in missing_ref
    long_prompt = [{**r, "prompt": r["prompt"] + " cat" * 40} if i == 2 else r for i, r in enumerate(pairs)]
    fills = bad(tiny_model, tmp_path, capsys, long_prompt, "--max-length", "24")
    assert "row 3: the prompt has" in fills and "--max-length 24" in fills


def test_identical_pairs_are_warned_counted_and_skipped(tiny_model, tmp_path, caplog):
    rows = preference_rows(16)
    rows[0]["rejected"] = rows[0]["chosen"]
    rows[7]["rejected"] = rows[7]["chosen"]
    _, data = pair_data(tiny_model, tmp_path, rows)
    assert len(data.dataset) == 14
    assert "skipped 2 pairs whose chosen and rejected answers are identical" in caplog.text
