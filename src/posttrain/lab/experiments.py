"""The lab's experiments: the same story run with one knob turned, over several seeds.

    posttrain lab --experiment NAME --output DIR [--preset quick|full|smoke] [--seeds 0,1,2]

Each experiment is a list of arms. An arm runs a few of the lab's steps itself, with some preset
fields changed, and reads every other step from the arm it comes ``after``; the first arm, the
trunk, runs the shared steps (data, base, SFT, the biased pool's preferences and reward model)
once per seed. So ``DIR/seed-S/ARM/`` holds an arm's own steps, each marked done by its
``step.json``: an interrupted experiment resumes where it stopped. ``experiment.json`` holds the
settings, every arm's figures per seed and their means with a t-interval over the seeds;
``report.html`` draws them (``lab/experiment_report.py``).

  kl-sweep     PPO at several KL coefficients, 0 included (Gao, Schulman, Hilton 2022)
  frontier     DPO at several β and PPO at several KL coefficients: held-out gold against KL to
               SFT (Rafailov et al. 2023, figure 2)
  labels       the labelling budget: the biased, careful (dearer) and mixed pools at several total
               budgets; each pool's labels, its reward model against the truth, PPO's gold reward
  mitigations  from the biased pool: one reward model, an ensemble of three with conservative
               aggregation (min, mean − std, uwo; Coste et al. 2023), a larger KL coefficient, and
               PPO stopped by the gold monitor
  calibration  ECE and reliability of base, SFT, PPO and DPO on known questions, read from the
               greedy answer and as a multiple choice over every value (the GPT-4 technical
               report: RLHF degraded calibration)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from posttrain.errors import UserError
from posttrain.lab import pipeline
from posttrain.lab.presets import PRESETS, Preset
from posttrain.lab.steps import STEP_FILE, Progress, Run, make_lab, record, run_steps
from posttrain.training.output import Lock

log = logging.getLogger(__name__)

TRUNK = "trunk"
SHARED = ("data", "base", "sft", "preferences", "rm")


@dataclass(frozen=True)
class Arm:
    name: str
    steps: tuple[str, ...]  # the lab steps it runs itself, in the lab's order
    changes: Mapping[str, Any] = field(default_factory=dict)  # preset fields it sets
    after: str = TRUNK  # the arm whose outputs (and theirs, recursively) it reads for every other step
    evaluated: tuple[str, ...] = ()  # the models its evaluate step answers with
    label: str = ""  # how the report names it
    annotators: str = "biased"  # the pool that labels its preferences (lab/annotators.py)

    def title(self) -> str:
        return self.label or self.name


def trunk() -> Arm:
    return Arm(TRUNK, (*SHARED, "evaluate"), after="", evaluated=("base", "sft"), label="SFT")


def ppo_arm(name: str, label: str, **changes: Any) -> Arm:
    return Arm(name, ("ppo", "evaluate"), changes, evaluated=("ppo",), label=label)


def dpo_arm(name: str, label: str, **changes: Any) -> Arm:
    return Arm(name, ("dpo", "evaluate"), changes, evaluated=("dpo",), label=label)


KL_COEFS = (0.0, 0.02, 0.05, 0.2)
FRONTIER_KL = (0.02, 0.05, 0.2)
FRONTIER_BETA = (0.03, 0.1, 0.3, 1.0)
AGGREGATES = ("min", "mean_minus_std", "uwo")
ENSEMBLE = 3
LABEL_POOLS = ("biased", "careful", "mix")
LABEL_BUDGETS = (600, 3000)  # what the training labels may cost, in hurried labels


def kl_sweep() -> list[Arm]:
    return [trunk()] + [ppo_arm(f"kl-{c:g}", f"PPO, KL coef. {c:g}", ppo_kl_coef=c) for c in KL_COEFS]


def frontier() -> list[Arm]:
    ppo = [ppo_arm(f"ppo-kl-{c:g}", f"PPO, KL coef. {c:g}", ppo_kl_coef=c) for c in FRONTIER_KL]
    return [trunk(), *ppo, *(dpo_arm(f"dpo-beta-{b:g}", f"DPO, β {b:g}", dpo_beta=b) for b in FRONTIER_BETA)]


def labels() -> list[Arm]:
    """The trunk trains base and SFT only; every (pool, budget) arm buys its labels, trains a reward model, runs PPO."""
    base = Arm(TRUNK, ("data", "base", "sft"), after="", label="SFT")
    return [base] + [
        Arm(f"{pool}-{budget:g}", ("preferences", "rm", "ppo"), {"label_budget": budget}, annotators=pool,
            label=f"{pool}, budget {budget:g}")
        for pool in LABEL_POOLS for budget in LABEL_BUDGETS
    ]  # fmt: skip


def mitigations() -> list[Arm]:
    ensemble = Arm("ensemble", ("rm",), {"rm_ensemble": ENSEMBLE}, label=f"{ENSEMBLE} reward models")
    return [
        trunk(),
        ppo_arm("single", "one reward model"),
        ensemble,
        *(Arm(f"ensemble-{a}", ("ppo", "evaluate"), {"rm_ensemble": ENSEMBLE, "ppo_ensemble_aggregate": a},
              after="ensemble", evaluated=("ppo",), label=f"ensemble of {ENSEMBLE}, {a}") for a in AGGREGATES),
        ppo_arm("kl-0.2", "KL coef. 0.2 (4×)", ppo_kl_coef=0.2),
        ppo_arm("early-stop", "stopped by the gold monitor", ppo_stop_on_overoptimisation=True),
    ]  # fmt: skip


def calibration() -> list[Arm]:
    choice = {"eval_choice_calibration": True}
    reference = Arm("reference", ("evaluate",), choice, evaluated=("base", "sft"), label="base and SFT")
    return [trunk(), reference, ppo_arm("ppo", "PPO", **choice), dpo_arm("dpo", "DPO", **choice)]


@dataclass(frozen=True)
class Experiment:
    arms: Callable[[], list[Arm]]
    summarise: Callable[[list[Arm], dict[str, list[dict]]], dict]  # (arms, arm -> per-seed results) -> figures


def arm_run(arm: Arm, arms: dict[str, Arm], root: Path, preset: Preset, seed: int) -> Run:
    """The run of one arm for one seed: its own directory, its preset, and where its other steps lie."""
    sources: dict[str, Path] = {}
    ancestor = arms.get(arm.after)
    while ancestor is not None:
        for name in ancestor.steps:
            sources.setdefault(name, root / ancestor.name / name)
        ancestor = arms.get(ancestor.after)
    for name in arm.steps:
        sources.pop(name, None)
    changed = dataclasses.replace(preset, **arm.changes)
    return Run(root / arm.name, changed, seed, arm.annotators, make_lab(preset, seed), sources, arm.evaluated)


def arm_results(run: Run, arm: Arm) -> dict:
    """What an arm measured for one seed: its own steps' records (the labels bought, the reward model's accuracy,
    the evaluation's models, PPO's trajectory and fit) and their seconds."""
    found: dict[str, Any] = {"seconds": sum(record(run.out / name)["seconds"] for name in arm.steps)}
    if "preferences" in arm.steps:
        found["preferences"] = {key: value for key, value in record(run.out / "preferences").items() if key != "audit"}
    if "rm" in arm.steps:
        found["rm"] = record(run.out / "rm")
    if "evaluate" in arm.steps:
        found["models"] = record(run.out / "evaluate")["models"]
    if "ppo" in arm.steps:
        ppo = record(run.out / "ppo")
        found["ppo"] = ppo | {"gold_arc": pipeline.gold_arc(ppo["trajectory"])}
    return found


@dataclass(frozen=True)
class ExperimentConfig:
    experiment: str
    output: str
    preset: str = "quick"
    seeds: tuple[int, ...] = (0,)
    reuse: str = ""  # another experiment (or a biased lab run) whose shared steps are copied into the trunks
    only: tuple[str, ...] = ()  # run these arms (and those they come after) instead of all

    def validate(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise UserError(f"--experiment {self.experiment}: unknown; valid experiments: {', '.join(EXPERIMENTS)}")
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset}: unknown preset; valid presets: {', '.join(PRESETS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds {','.join(map(str, self.seeds))}: give distinct seeds, e.g. 0,1,2")


def chosen_arms(arms: list[Arm], only: tuple[str, ...]) -> list[Arm]:
    """``arms`` in their order, kept when named in ``only`` or needed by one that is (all when ``only`` is empty)."""
    if not only:
        return arms
    by_name = {a.name: a for a in arms}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: not an arm of this experiment; its arms: {', '.join(by_name)}")
    kept = set()
    for name in only:
        while name:
            kept.add(name)
            name = by_name[name].after
    return [a for a in arms if a.name in kept]


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None


def run_experiment(config: ExperimentConfig) -> Path:
    """Run (or resume) every arm of every seed, then write experiment.json and report.html."""
    from posttrain.lab.experiment_report import write_report

    config.validate()
    out, experiment = Path(config.output), EXPERIMENTS[config.experiment]
    lock = Lock(out.absolute(), config.output)
    try:
        settings = {"experiment": config.experiment, "preset": config.preset,
                    "preset_values": dataclasses.asdict(PRESETS[config.preset])}  # fmt: skip
        pipeline.start_run(out, settings, what="lab experiment")
        arms = chosen_arms(experiment.arms(), config.only)
        by_seed = [{arm.name: run_arm(config, arms, arm, seed) for arm in arms} for seed in config.seeds]
        results = {arm.name: [found[arm.name] for found in by_seed] for arm in arms}  # arm -> one result a seed
        summary = {"experiment": config.experiment, "preset": config.preset, "seeds": list(config.seeds),
                   "arms": {a.name: {"label": a.title(), "changes": dict(a.changes)} for a in arms},
                   "figures": experiment.summarise(arms, results), "results": results}  # fmt: skip
        (out / "experiment.json").write_text(json.dumps(summary, indent=2))
        write_report(out, summary)
    finally:
        lock.release()
    return out


def run_arm(config: ExperimentConfig, arms: list[Arm], arm: Arm, seed: int) -> dict:
    root = Path(config.output) / f"seed-{seed}"
    by_name = {a.name: a for a in arms}
    run = arm_run(arm, by_name, root, PRESETS[config.preset], seed)
    settings = pipeline.LabConfig(str(run.out), config.preset, seed, arm.annotators)
    lab_json = pipeline.lab_settings(settings) | {"preset_values": dataclasses.asdict(run.preset), "arm": arm.name}
    pipeline.start_run(run.out, lab_json, what="lab experiment arm")
    if arm.name == TRUNK and config.reuse:
        reuse_trunk(Path(config.reuse), seed, run.out, lab_json, arm.steps)
    steps = [s for s in pipeline.STEPS if s.name in arm.steps]
    progress = Progress({s.name: s.seconds for s in steps})
    run_steps(run, steps, progress, label=f"{config.experiment} seed {seed} {arm.name}")
    return arm_results(run, arm)


def reuse_trunk(source: Path, seed: int, trunk_dir: Path, settings: dict[str, Any], steps: tuple[str, ...]) -> None:
    """Copy the trunk's ``steps`` that ``source`` finished for ``seed`` into the trunk: ``source`` is another
    experiment (its ``seed-S/trunk``) or a lab run of this seed with the biased pool, with the same preset values."""
    run = source / f"seed-{seed}" / TRUNK if (source / f"seed-{seed}").is_dir() else source
    if not (run / "lab.json").is_file():
        raise UserError(f"--reuse {source}: neither a lab experiment with seed {seed} nor a lab run (no lab.json)")
    theirs = json.loads((run / "lab.json").read_text())
    same = ("seed", "annotators", "preset_values")
    if any(theirs.get(key) != settings[key] for key in same):
        raise UserError(f"--reuse {source}: another seed, pool or preset than this experiment's trunk (see {run})")
    for name in steps:
        if (run / name / STEP_FILE).is_file() and not (trunk_dir / name).exists():
            shutil.copytree(run / name, trunk_dir / name)
            log.info("lab: %s copied from %s", name, run)


# --- figures over seeds ------------------------------------------------------------------------


def over_seeds(values: list[float | None]) -> dict[str, Any]:
    """The mean of one figure over seeds, its 95% t-interval (None for one seed or none) and the values."""
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return {"mean": None, "ci": None, "n": 0, "values": values}
    mean = float(np.mean(kept))
    if len(kept) < 2:
        return {"mean": mean, "ci": None, "n": 1, "values": values}
    if max(kept) == min(kept):  # no spread
        return {"mean": mean, "ci": [mean, mean], "n": len(kept), "values": values}
    low, high = stats.t.interval(0.95, len(kept) - 1, loc=mean, scale=stats.sem(kept))
    return {"mean": mean, "ci": [float(low), float(high)], "n": len(kept), "values": values}


def quarter_mean(trajectory: list[dict], key: str, last: bool) -> float | None:
    """The mean of ``key`` over the first or last quarter of PPO's iterations (None-valued ones left out)."""
    quarter = max(1, len(trajectory) // 4)
    part = trajectory[-quarter:] if last else trajectory[:quarter]
    values = [row[key] for row in part if row[key] is not None]
    return sum(values) / len(values) if values else None


def rollout_figures(ppo: dict) -> dict[str, float | None]:
    """One PPO run's figures from its rollouts: gold and proxy at the start and end, the gold arc's peak and drop,
    √KL and invention on unknowable questions at the end."""
    trajectory, arc = ppo["trajectory"], ppo["gold_arc"]
    return {
        "gold_start": quarter_mean(trajectory, "gold", last=False),
        "gold_end": quarter_mean(trajectory, "gold", last=True),
        "gold_peak": arc["peak"],
        "gold_drop": arc["peak"] - arc["end"],
        "proxy_end": quarter_mean(trajectory, "proxy", last=True),
        "sqrt_kl_end": quarter_mean(trajectory, "sqrt_kl", last=True),
        "invention_end": quarter_mean(trajectory, "hallucination_unknowable", last=True),
        "iterations": len(trajectory),
    }


def ppo_figures(result: dict) -> dict[str, float | None]:
    """One PPO arm's figures: its rollouts', the held-out gold and KL of its final model, and the fit of Gao's
    RL form."""
    held_out = result["models"]["ppo"]
    fit = result["ppo"]["overoptimisation"]["fit"] or {}
    return rollout_figures(result["ppo"]) | {
        "held_out_gold": held_out["gold_reward"],
        "held_out_kl": held_out["kl_to_sft"],
        "fit_alpha": fit.get("alpha"),
        "fit_beta": fit.get("beta"),
        "fit_peak_sqrt_kl": fit.get("peak_d"),
    }


def aggregate(per_seed: list[dict[str, float | None]]) -> dict[str, dict]:
    """Each figure of per-seed dicts, over seeds."""
    return {key: over_seeds([figures[key] for figures in per_seed]) for key in per_seed[0]}


def summarise_ppo_arms(arms: list[Arm], results: dict[str, list[dict]]) -> dict:
    """Per PPO arm, its figures over seeds; and the arm whose gold peaked highest (mean over seeds)."""
    figures = {a.name: aggregate([ppo_figures(r) for r in results[a.name]]) for a in arms if "ppo" in a.steps}
    best = max(figures, key=lambda name: figures[name]["gold_peak"]["mean"])
    peak_steps = [r["ppo"]["gold_arc"]["peak_step"] for r in results[best]]
    return {"arms": figures, "best": {"arm": best, "peak_step": peak_steps}}


def label_figures(result: dict) -> dict[str, float | None]:
    """One labels arm's figures: what its budget bought and how right those labels are, its reward model's
    accuracy against the truth on every training pair (the questions PPO asks, labelled or not) and on the held-out
    pairs, and against its own pool's labels there, and PPO's rollouts."""
    bought, rm = result["preferences"]["bought"], result["rm"]
    return {
        "cost": bought["cost"],
        "labels": bought["labels"],
        "pairs": bought["pairs"],
        "labels_vs_gold": bought["agreement_with_gold"],
        "rm_vs_gold_train": rm["accuracy_vs_gold_train"],
        "rm_vs_gold": rm["accuracy_vs_gold"],
        "rm_vs_labels": rm["accuracy_vs_labels"],
    } | rollout_figures(result["ppo"])


def summarise_labels(arms: list[Arm], results: dict[str, list[dict]]) -> dict:
    """Per (pool, budget) arm its figures over seeds; per budget, the pool whose reward model matched the truth
    best on the training questions, and those whose PPO peaked and ended with the most gold (means over seeds;
    None where an arm has no mean)."""
    figures = {a.name: aggregate([label_figures(r) for r in results[a.name]]) for a in arms if a.name != TRUNK}
    pools = {a.name: (a.annotators, a.changes["label_budget"]) for a in arms if a.name != TRUNK}
    best: dict[str, dict[str, str | None]] = {}
    for budget in sorted({b for _, b in pools.values()}):
        best[f"{budget:g}"] = {}
        for key in ("rm_vs_gold_train", "gold_peak", "gold_end"):
            means = {n: figures[n][key]["mean"] for n, (_, b) in pools.items() if b == budget}
            best[f"{budget:g}"][key] = None if None in means.values() else pools[max(means, key=means.get)][0]
    return {"arms": figures, "pools": pools, "best": best}


def summarise_frontier(arms: list[Arm], results: dict[str, list[dict]]) -> dict:
    """Each model's held-out gold reward and KL to SFT, over seeds: SFT (KL 0), then every arm."""
    points = {"sft": model_point(results[TRUNK], "sft")}
    for arm in arms[1:]:
        points[arm.name] = model_point(results[arm.name], arm.evaluated[0])
    return {"points": points}


def model_point(per_seed: list[dict], model: str) -> dict:
    return {
        "gold": over_seeds([r["models"][model]["gold_reward"] for r in per_seed]),
        "kl": over_seeds([r["models"][model]["kl_to_sft"] for r in per_seed]),
    }


def summarise_calibration(arms: list[Arm], results: dict[str, list[dict]]) -> dict:
    """Per model: ECE, Brier, accuracy on the known questions it answered, and how many it answered."""
    sources = {"base": "reference", "sft": "reference", "ppo": "ppo", "dpo": "dpo"}
    models = {}
    for model, arm in sources.items():
        if arm not in results:  # left out by --arms
            continue
        free = [r["models"][model]["calibration"] for r in results[arm]]
        choice = [r["models"][model]["calibration_choice"] for r in results[arm]]
        models[model] = {
            "ece": over_seeds([c["ece"] for c in free]),
            "brier": over_seeds([c["brier"] for c in free]),
            "answered": over_seeds([c["n"] for c in free]),
            "ece_choice": over_seeds([c["ece"] for c in choice]),
            "brier_choice": over_seeds([c["brier"] for c in choice]),
            "accuracy_choice": over_seeds([c["accuracy"] for c in choice]),
            "bins_choice": pooled_bins([c["bins"] for c in choice]),
        }
    return {"models": models}


def pooled_bins(per_seed: list[list[dict]]) -> list[dict]:
    """The reliability bins of every seed pooled: counts summed, confidence and accuracy weighted by count (a seed
    whose model answered no known question has no bins)."""
    pooled = []
    for bins in zip(*(b for b in per_seed if b), strict=True):
        count = sum(b["count"] for b in bins)
        weighted = {key: sum(b[key] * b["count"] for b in bins if b["count"]) / count if count else None
                    for key in ("mean_confidence", "accuracy")}  # fmt: skip
        pooled.append({"lower": bins[0]["lower"], "upper": bins[0]["upper"], "count": count, **weighted})
    return pooled


EXPERIMENTS = {
    "kl-sweep": Experiment(kl_sweep, summarise_ppo_arms),
    "frontier": Experiment(frontier, summarise_frontier),
    "labels": Experiment(labels, summarise_labels),
    "mitigations": Experiment(mitigations, summarise_ppo_arms),
    "calibration": Experiment(calibration, summarise_calibration),
}
