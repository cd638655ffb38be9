"""The lab pipeline chains every step through the stage functions; steps are skipped once done."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main
from posttrain.lab.steps import STEP_FILE, Progress, clock

STEPS = ("data", "base", "sft", "preferences", "rm", "ppo", "dpo", "evaluate")


@pytest.mark.slow
def test_smoke_preset_runs_every_step_and_resumes(tmp_path, caplog):
    out = tmp_path / "lab"
    assert main(["lab", "--output", str(out), "--preset", "smoke"]) == 0
    for step in STEPS:
        assert (out / step / STEP_FILE).is_file(), step
    assert "<img" in (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    keys = {
        "gold_reward",
        "accuracy_known",
        "abstain_unknowable",
        "hallucination_rate",
        "format_compliance",
        "mean_length",
    }
    assert set(summary["models"]) == {"base", "sft", "ppo", "dpo"}
    assert all(keys <= set(m) for m in summary["models"].values())
    assert {"agreement", "agreement_with_gold"} <= set(summary["annotators"])
    assert {"accuracy_vs_labels", "accuracy_vs_gold"} <= set(summary["reward_model"])
    assert summary["models"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)  # the same model
    preferences = [json.loads(line) for line in (out / "preferences" / "preferences.jsonl").read_text().splitlines()]
    assert {"prompt", "chosen", "rejected", "annotator_id", "pair_id", "position", "gold"} <= set(preferences[0])
    # every training pair once, the truly better answer chosen: where the labels' "gold" says so, the same answers
    truth = {row["pair_id"]: row for row in map(json.loads, (out / "preferences" / "preferences_gold.jsonl").open())}
    for row in preferences:
        if row["gold"] is None:
            assert row["pair_id"] not in truth
        else:
            better = row["chosen"] if row["gold"] == "chosen" else row["rejected"]
            assert truth[row["pair_id"]]["chosen"] == better
    assert len(truth) == len({row["pair_id"] for row in preferences if row["gold"] is not None})
    accuracy = summary["reward_model"]["accuracy_vs_gold_train"]  # None when every pair is a tie
    assert summary["reward_model"]["pairs_train"] == len(truth)
    assert (accuracy is None) == (not truth) and (accuracy is None or 0.0 <= accuracy <= 1.0)
    trajectory = json.loads((out / "ppo" / STEP_FILE).read_text())["trajectory"]
    assert [r["step"] for r in trajectory] == [1, 2]
    assert {"proxy", "gold", "kl", "sqrt_kl", "hallucination_unknowable", "abstain_known"} <= set(trajectory[0])
    # PPO was watched through --gold-reward: each iteration's gold is the mean of its samples' gold scores
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    for row in trajectory:
        golds = [s["gold"] for s in samples if s["step"] == row["step"]]
        assert row["gold"] == pytest.approx(sum(golds) / len(golds))
    assert set(summary["ppo"]["overoptimisation"]) == {"fit", "onset", "best_gold", "warnings"}
    assert {"start", "peak", "peak_step", "end"} == set(summary["ppo"]["gold_arc"])
    (out / "evaluate" / STEP_FILE).unlink()  # as if interrupted during evaluation
    caplog.clear()
    assert main(["lab", "--output", str(out), "--preset", "smoke"]) == 0
    assert "lab: base already done" in caplog.text and "lab: evaluate done" in caplog.text
    assert "lab: step 8/8 evaluate (about" in caplog.text
    asked = [json.loads(line) for line in (out / "data" / "evaluation.jsonl").read_text().splitlines()]
    held_out = (out / "data" / "held_out.jsonl").read_text().splitlines()
    unknowable = sum(not q["known"] for q in asked)  # smoke: the held-out questions thrice, 2 unseen towns
    assert len(asked) == 3 * len(held_out) + 6 and unknowable >= 6
    facts = len({q["id"] for q in asked})
    assert summary["evaluation"] == {"evaluation_questions": len(asked), "evaluation_facts": facts,
                                     "evaluation_unknowable": unknowable}  # fmt: skip
    for metrics in summary["models"].values():
        assert metrics["n_questions"] == len(asked) and metrics["abstain_unknowable_n"] == unknowable
        assert metrics["n_facts"] == facts
        low, high = metrics["gold_reward_ci"]
        assert low <= metrics["gold_reward"] <= high

    careful = tmp_path / "careful"  # the other pool, reusing the steps that do not depend on it
    caplog.clear()
    assert main(["lab", "--output", str(careful), "--preset", "smoke", "--annotators", "careful",
                 "--reuse", str(out)]) == 0  # fmt: skip
    assert "lab: base copied from" in caplog.text and "lab: step 3/8" not in caplog.text
    assert (careful / "base" / "model.safetensors").read_bytes() == (out / "base" / "model.safetensors").read_bytes()
    assert json.loads((careful / "summary.json").read_text())["annotators"]["preset"] == "careful"
    rows = (careful / "preferences" / "preferences.jsonl").read_text().splitlines()
    assert rows and all(json.loads(row)["annotator_id"].startswith("careful-") for row in rows)
    assert main(["lab", "--output", str(tmp_path / "seed1"), "--preset", "smoke", "--seed", "1",
                 "--reuse", str(out)]) == 2  # fmt: skip


def test_time_left_scales_by_the_speed_so_far():
    progress = Progress({"a": 10, "b": 20, "c": 30}, prior=0.0)
    assert progress.seconds_left(["a", "b", "c"]) == 60  # nothing ran yet: the expected times
    progress.ran["a"] = 20.0  # this machine is twice as slow
    assert progress.seconds_left(["b", "c"]) == 100
    damped = Progress({"a": 10, "b": 20, "c": 30}, {"a": 20.0}, prior=30.0)
    assert damped.seconds_left(["b", "c"]) == pytest.approx(50 * (20 + 30) / (10 + 30))
    assert clock(65) == "1 min 05 s" and clock(42.4) == "42 s"


def test_lab_bad_input(tmp_path, capsys):
    assert main(["lab", "--output", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert "--preset huge: unknown preset; valid presets: quick, smoke, full" in capsys.readouterr().err
    assert main(["lab", "--output", str(tmp_path / "x"), "--annotators", "sloppy"]) == 2
    assert "--annotators sloppy: unknown pool; valid pools: biased, careful, mix" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["lab", "--output", str(other)]) == 2
    assert "holds something other than a lab run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
