"""The lab's experiments: arms read the shared steps from the trunk, figures over seeds by hand, and each
experiment end to end on the smoke preset (figures computed and in range; the directions need the quick
preset, whose figures over seeds are in docs/lab.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.lab.experiments import (
    EXPERIMENTS,
    TRUNK,
    arm_run,
    chosen_arms,
    mitigations,
    over_seeds,
    pooled_bins,
    quarter_mean,
)
from posttrain.lab.pipeline import STEPS
from posttrain.lab.presets import PRESETS
from posttrain.lab.steps import STEP_FILE, shared_steps


def test_shared_steps_are_those_before_the_labels():
    assert shared_steps(STEPS) == ("data", "base", "sft")


def test_an_arm_reads_every_step_it_does_not_run_from_the_arms_before_it(tmp_path):
    arms = {a.name: a for a in mitigations()}
    run = arm_run(arms["ensemble-min"], arms, tmp_path, PRESETS["smoke"], seed=3)
    assert run.out == tmp_path / "ensemble-min" and run.seed == 3
    assert run.path("rm") == tmp_path / "ensemble" / "rm"  # the ensemble arm's reward models
    assert run.path("sft") == tmp_path / TRUNK / "sft" and run.path("data") == tmp_path / TRUNK / "data"
    assert run.path("ppo") == tmp_path / "ensemble-min" / "ppo"  # its own
    assert run.preset.rm_ensemble == 3 and run.preset.ppo_ensemble_aggregate == "min"
    assert run.evaluated == ("ppo",)
    trunk = arm_run(arms[TRUNK], arms, tmp_path, PRESETS["smoke"], seed=3)
    assert trunk.sources == {} and trunk.evaluated == ("base", "sft")


def test_over_seeds_by_hand():
    # mean 2, standard error 1/√3, t(0.975, 2 df) = 4.3027: 2 ± 2.4841
    figure = over_seeds([1.0, 2.0, 3.0])
    assert figure["mean"] == 2.0 and figure["n"] == 3
    assert figure["ci"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], abs=1e-5)
    assert over_seeds([0.5])["ci"] is None and over_seeds([0.5])["mean"] == 0.5
    assert over_seeds([None, None])["mean"] is None
    assert over_seeds([0.2, 0.2])["ci"] == [0.2, 0.2]


def test_pooled_bins_weight_by_count():
    a = [{"lower": 0.0, "upper": 0.5, "count": 1, "mean_confidence": 0.2, "accuracy": 0.0},
         {"lower": 0.5, "upper": 1.0, "count": 0, "mean_confidence": None, "accuracy": None}]  # fmt: skip
    b = [{"lower": 0.0, "upper": 0.5, "count": 3, "mean_confidence": 0.4, "accuracy": 1 / 3},
         {"lower": 0.5, "upper": 1.0, "count": 0, "mean_confidence": None, "accuracy": None}]  # fmt: skip
    first, second = pooled_bins([a, [], b])  # the middle seed's model answered no known question
    assert first["count"] == 4 and first["mean_confidence"] == pytest.approx((0.2 + 3 * 0.4) / 4)
    assert first["accuracy"] == pytest.approx(1 / 4)
    assert second == {"lower": 0.5, "upper": 1.0, "count": 0, "mean_confidence": None, "accuracy": None}


def test_quarter_mean_leaves_out_missing_values():
    rows = [{"gold": g} for g in (1.0, None, 3.0, 5.0, 7.0, None, 0.0, 2.0)]
    assert quarter_mean(rows, "gold", last=False) == 1.0 and quarter_mean(rows, "gold", last=True) == 1.0


def test_experiment_bad_input(tmp_path, capsys):
    assert main(["lab", "--experiment", "nope", "--output", str(tmp_path / "x")]) == 2
    assert "--experiment nope: unknown; valid experiments: kl-sweep, frontier, labels, mitigations, calibration" in (
        capsys.readouterr().err
    )
    assert main(["lab", "--experiment", "kl-sweep", "--seeds", "0,x", "--output", str(tmp_path / "x")]) == 2
    assert "--seeds 0,x: expected comma-separated integers" in capsys.readouterr().err
    assert main(["lab", "--experiment", "kl-sweep", "--seed", "1", "--output", str(tmp_path / "x")]) == 2
    assert main(["lab", "--seeds", "0,1", "--output", str(tmp_path / "x")]) == 2
    assert "--seeds and --arms go with --experiment" in capsys.readouterr().err
    assert main(["lab", "--experiment", "kl-sweep", "--arms", "kl-9", "--output", str(tmp_path / "y")]) == 2
    assert "--arms kl-9: not an arm of this experiment; its arms: trunk, kl-0, kl-0.02" in capsys.readouterr().err


def test_chosen_arms_keep_the_arms_they_read_from():
    arms = mitigations()
    assert [a.name for a in chosen_arms(arms, ("ensemble-uwo",))] == [TRUNK, "ensemble", "ensemble-uwo"]
    assert chosen_arms(arms, ()) == arms


LABEL_ARMS = "biased-600,careful-600,mix-600"


def experiment(tmp_path: Path, name: str, seeds: str = "0", *extra: str) -> dict:
    out = tmp_path / name
    command = ["lab", "--experiment", name, "--preset", "smoke", "--seeds", seeds, "--output", str(out), *extra]
    assert main(command) == 0
    assert "<img" in (out / "report.html").read_text()
    return json.loads((out / "experiment.json").read_text())


@pytest.mark.slow
def test_kl_sweep_and_mitigations_on_the_smoke_preset(tmp_path, caplog):
    summary = experiment(tmp_path, "kl-sweep", "0,1", "--arms", "kl-0,kl-0.2")  # the two ends, to save time
    figures = summary["figures"]["arms"]
    assert list(figures) == ["kl-0", "kl-0.2"] and list(summary["arms"]) == [TRUNK, "kl-0", "kl-0.2"]
    for arm in figures.values():
        assert arm["gold_peak"]["n"] == 2 and arm["gold_peak"]["ci"][0] <= arm["gold_peak"]["mean"]
        assert -1.6 <= arm["gold_end"]["mean"] <= 1.0 and arm["held_out_kl"]["mean"] >= -1e-6
    assert summary["figures"]["best"]["arm"] in figures and len(summary["figures"]["best"]["peak_step"]) == 2
    # one trunk per seed, shared by every arm; the arms run only PPO and its evaluation
    for seed in (0, 1):
        root = tmp_path / "kl-sweep" / f"seed-{seed}"
        assert sorted(p.name for p in (root / "kl-0").iterdir()) == ["evaluate", "lab.json", "ppo"]
        assert (root / TRUNK / "rm" / STEP_FILE).is_file()
    caplog.clear()  # done steps are skipped when run again
    experiment(tmp_path, "kl-sweep", "0,1", "--arms", "kl-0,kl-0.2")
    assert "step 1/" not in caplog.text and "ppo already done" in caplog.text

    caplog.clear()  # the shared steps of seed 0, copied from the sweep
    summary = experiment(tmp_path, "mitigations", "0", "--reuse", str(tmp_path / "kl-sweep"))
    assert "lab: rm copied from" in caplog.text and "mitigations seed 0 trunk: base already done" in caplog.text
    arms = summary["figures"]["arms"]
    assert set(arms) == {"single", "ensemble-min", "ensemble-mean_minus_std", "ensemble-uwo", "kl-0.2", "early-stop"}
    ensemble = tmp_path / "mitigations" / "seed-0" / "ensemble" / "rm"
    assert json.loads((ensemble / "ensemble.json").read_text()) and (ensemble / "member-2").is_dir()


@pytest.mark.slow
def test_frontier_calibration_and_labels_on_the_smoke_preset(tmp_path):
    points = experiment(tmp_path, "frontier")["figures"]["points"]
    dpo = {f"dpo-beta-{b}" for b in ("0.03", "0.1", "0.3", "1")}
    assert set(points) == {"sft", "ppo-kl-0.02", "ppo-kl-0.05", "ppo-kl-0.2", *dpo}
    assert points["sft"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert all(p["kl"]["mean"] >= -1e-3 and -1.6 <= p["gold"]["mean"] <= 1.0 for p in points.values())
    models = experiment(tmp_path, "calibration", "0", "--reuse", str(tmp_path / "frontier"))["figures"]["models"]
    assert set(models) == {"base", "sft", "ppo", "dpo"}
    for figures in models.values():
        ece = figures["ece"]["mean"]
        assert ece is None or 0.0 <= ece <= 1.0
        assert 0.0 <= figures["ece_choice"]["mean"] <= 1.0 and 0.0 <= figures["accuracy_choice"]["mean"] <= 1.0
        assert sum(b["count"] for b in figures["bins_choice"]) > 0  # every known question gets a pick

    summary = experiment(tmp_path, "labels", "0", "--reuse", str(tmp_path / "frontier"), "--arms", LABEL_ARMS)
    root = tmp_path / "labels" / "seed-0"
    assert sorted(p.name for p in (root / TRUNK).iterdir()) == ["base", "data", "lab.json", "sft"]  # copied
    arms = summary["figures"]["arms"]
    assert set(arms) == {"biased-600", "careful-600", "mix-600"}
    for name, figures in arms.items():
        assert sorted(p.name for p in (root / name).iterdir()) == ["lab.json", "ppo", "preferences", "rm"]
        assert 0 < figures["cost"]["mean"] <= 600 and figures["labels"]["mean"] >= figures["pairs"]["mean"]
        assert 0.0 <= figures["rm_vs_labels"]["mean"] <= 1.0
        for key in ("labels_vs_gold", "rm_vs_gold_train"):  # None when every pair is a tie (smoke answers)
            assert figures[key]["mean"] is None or 0.0 <= figures[key]["mean"] <= 1.0
        assert -1.6 <= figures["gold_end"]["mean"] <= 1.0
    assert arms["careful-600"]["cost"]["mean"] == 3 * arms["careful-600"]["labels"]["mean"]
    assert arms["biased-600"]["cost"]["mean"] == arms["biased-600"]["labels"]["mean"]
    rows = (root / "mix-600" / "preferences" / "preferences.jsonl").read_text().splitlines()
    assert {json.loads(r)["annotator_id"].split("-")[0] for r in rows} == {"biased", "careful"}
    assert set(summary["figures"]["best"]["600"].values()) <= {"biased", "careful", "mix", None}


def test_every_experiment_is_documented():
    text = (Path(__file__).parent.parent / "docs" / "lab.md").read_text()
    assert all(f"`{name}`" in text for name in EXPERIMENTS)
