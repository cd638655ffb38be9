"""The lab's pipeline, step by step, through the same stage functions as the CLI.

  data         the world, its document corpus, careful demonstrations for the training
               questions (shy ones: see world.demonstrations), prompts and held-out questions
  base         a BPE tokenizer trained on the corpus and a small Llama pre-trained on it (a
               document completer: the SFT stage on ``text`` rows is plain language modelling)
  sft          supervised fine-tuning on the careful demonstrations
  preferences  several sampled answers per prompt from the SFT model, pairs labelled by the
               simulated annotator pool (with annotator ids; a share labelled three times); the
               held-out questions' pairs, labelled too, test the reward model
  rm           a reward model on those labels, scored against the held-out labels and the truth
  ppo          PPO against the reward model; every rollout is also scored by the gold judge
  dpo          DPO on the same labels
  evaluate     every model answers the evaluation set; the gold judge scores them; KL to SFT

Each step writes under ``OUTPUT/<step>/`` and marks itself done last (``step.json``), so a
finished step is skipped and an interrupted run resumes at the step it stopped in. Then
``summary.json`` gathers the numbers and ``report.html`` shows them.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.instruments.audit import audit_rows, write_audit
from posttrain.lab import annotators as ann
from posttrain.lab import evaluation, gold, world
from posttrain.lab.presets import PRESETS, Preset
from posttrain.lab.report import write_report
from posttrain.lab.report_audit import audit_summary
from posttrain.lab.steps import STEP_FILE, Lab, Progress, Run, Step, make_lab, record, run_steps, shared_steps
from posttrain.models.factory import build_llama, train_tokenizer
from posttrain.stages.dpo import DPOConfig, run_dpo
from posttrain.stages.ppo import PPOConfig, run_ppo
from posttrain.stages.rm import RMConfig, run_rm
from posttrain.stages.sft import SFTConfig, run_sft
from posttrain.training.output import Lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabConfig:
    output: str
    preset: str = "quick"
    seed: int = 0
    annotators: str = "biased"  # "biased", "careful" or "mix" (see lab/annotators.py)
    reuse: str = ""  # another lab run whose annotator-independent steps (shared_steps) are copied

    def resolved(self) -> Preset:
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset}: unknown preset; valid presets: {', '.join(PRESETS)}")
        if self.annotators not in ann.POOLS:
            raise UserError(f"--annotators {self.annotators}: unknown pool; valid pools: {', '.join(ann.POOLS)}")
        return PRESETS[self.preset]


def validated(config):
    """A stage config checked as the CLI checks it (``validate`` also fills derived fields)."""
    config.validate()
    return config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(run: Run, out: Path) -> dict:
    """The questions, split: held-out ones for the evaluation; the rest are the prompts of the
    preference pairs and of PPO, and ``demonstrated_share`` of them have SFT demonstrations
    (the others are questions the SFT model has never been shown an answer to). The evaluation set
    asks the held-out questions in each phrasing, and about towns no text names."""
    preset, lab = run.preset, run.lab
    train, held_out = world.split_questions(lab.questions, run.seed, held_out=preset.held_out_share)
    sft, _ = world.split_questions(train, run.seed + 1, held_out=1 - preset.demonstrated_share)
    corpus = world.pretraining_corpus(lab.world, run.seed, preset.corpus_copies, preset.arithmetic_copies)
    evaluation_set = world.evaluation_questions(lab.world, held_out, run.seed)
    write_jsonl(out / "corpus.jsonl", [{"text": d} for d in corpus])
    write_jsonl(out / "sft.jsonl", world.demonstrations(lab.world, sft, run.seed, unsure=preset.unsure_share))
    write_jsonl(out / "prompts.jsonl", world.prompt_rows(train))
    write_jsonl(out / "held_out.jsonl", [asdict(q) for q in held_out])
    write_jsonl(out / "evaluation.jsonl", [asdict(q) for q in evaluation_set])
    return {"sft_questions": len(sft), "prompt_questions": len(train), "held_out_questions": len(held_out),
            "evaluation_questions": len(evaluation_set), "evaluation_facts": len({q.id for q in evaluation_set}),
            "evaluation_unknowable": sum(not q.known for q in evaluation_set)}  # fmt: skip


def pretrain(run: Run, out: Path) -> dict:
    """A tokenizer trained on the corpus, a random Llama, then language modelling on the corpus."""
    preset, corpus = run.preset, run.path("data") / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=preset.vocab_size)
    init = out.parent / "init"
    build_llama(tokenizer, preset.hidden_size, preset.num_layers, num_heads=preset.num_heads,
                num_kv_heads=preset.num_kv_heads, intermediate_size=preset.intermediate_size, max_positions=512,
                seed=run.seed).save_pretrained(init)  # fmt: skip
    tokenizer.save_pretrained(init)
    stage = SFTConfig(
        model=str(init),
        data=str(corpus),
        output=str(out),
        max_steps=preset.pretrain_steps,
        batch_size=preset.pretrain_batch_size,
        learning_rate=preset.pretrain_learning_rate,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        max_length=preset.pretrain_max_length,
        packing=True,
        save_steps=0,
        logging_steps=50,
        seed=run.seed,
        overwrite=True,
    )
    run_sft(validated(stage))
    return {}


def finetune(run: Run, out: Path) -> dict:
    stage = SFTConfig(
        model=str(run.path("base")),
        data=str(run.path("data") / "sft.jsonl"),
        output=str(out),
        max_steps=run.preset.sft_steps,
        batch_size=run.preset.sft_batch_size,
        learning_rate=run.preset.sft_learning_rate,
        lr_scheduler="cosine",
        save_steps=0,
        logging_steps=25,
        seed=run.seed,
        overwrite=True,
    )
    run_sft(validated(stage))
    return {}


def load_questions(path: Path) -> list[world.Question]:
    return [world.Question(**json.loads(line)) for line in path.read_text().splitlines()]


def sample_pairs(rows, sampled, by_id, the_world, per_prompt: int, seed: int) -> list[ann.Pair]:
    """Up to ``per_prompt`` pairs of distinct sampled answers per prompt, drawn at random from all
    couples (as InstructGPT compares every couple of a ranked set), with their gold judgements."""
    rng, pairs = random.Random(seed), []
    for row, texts in zip(rows, sampled, strict=True):
        question = by_id[row["question_id"]]
        distinct = dict.fromkeys(t for t in texts if t.strip())  # an empty answer is no row of a preference file
        couples = list(itertools.combinations(distinct, 2))
        for a, b in rng.sample(couples, min(per_prompt, len(couples))):
            judged = [gold.judge(question, t, the_world) for t in (a, b)]
            pairs.append((row["prompt"], a, judged[0], b, judged[1], question.id))
    return pairs


def preferences(run: Run, out: Path) -> dict:
    """Sample answers, pair them, let the annotator pool label the pairs (a share three times).

    The training prompts' pairs go to ``preferences.jsonl``, as many as ``label_budget`` buys; the
    held-out questions' pairs, all labelled the same way, to ``preferences_eval.jsonl``, to measure
    the reward model on questions it never saw; and every training pair once, oriented by the truth,
    to ``preferences_gold.jsonl``, to measure it on the questions PPO asks.
    """
    preset, data, seed = run.preset, run.path("data"), run.seed
    train = read_jsonl(data / "prompts.jsonl")
    rows = train + world.prompt_rows(load_questions(data / "held_out.jsonl"))
    the_world, by_id = run.lab.world, {q.id: q for q in run.lab.questions}
    sampling = evaluation.SamplingSettings(preset.sample_temperature, 1.0, preset.max_new_tokens)
    prompts = [r["prompt"] for r in rows]
    sampled = evaluation.answers(run.path("sft"), prompts, preset.samples_per_prompt, sampling, seed)
    pairs = sample_pairs(rows, sampled, by_id, the_world, preset.pairs_per_prompt, seed)
    workforce = ann.pool(run.annotators, preset.pool_size, seed)
    labelled = ann.label_pairs(pairs, workforce, preset.overlap, seed)
    golds = {i: gold.gold_preference(pair[2], pair[4]) for i, pair in enumerate(pairs)}  # 0, 1 or None (a tie)
    labelled = ann.with_gold(labelled, golds)
    train_ids = {r["question_id"] for r in train}
    held = {i for i, p in enumerate(pairs) if p[5] not in train_ids}
    costs = {a.id: a.cost for a in workforce}
    bought = ann.within_budget([r for r in labelled if r["pair_id"] not in held], costs, preset.label_budget, seed)
    write_jsonl(out / "preferences.jsonl", bought)
    write_jsonl(out / "preferences_eval.jsonl", [r for r in labelled if r["pair_id"] in held])
    write_jsonl(out / "preferences_gold.jsonl", ann.truth_rows(pairs, golds, set(golds) - held))
    audit = audit_rows(labelled, "the lab's labelled pairs", seed=seed)
    write_audit(audit, out)  # audit.json, audit.html: the same audit as `posttrain audit` on these rows
    return {"preset": run.annotators, "pairs": len(pairs), "labels": len(labelled),
            "agreement": ann.agreement(labelled),
            "agreement_untied": ann.agreement(labelled, {i for i, g in golds.items() if g is not None}),
            "agreement_with_gold": ann.gold_agreement(labelled), "audit": audit_summary(audit),
            "bought": {"pairs": len({r["pair_id"] for r in bought}), "labels": len(bought),
                       "cost": sum(costs[r["annotator_id"]] for r in bought),
                       "agreement_with_gold": ann.gold_agreement(bought)}}  # fmt: skip


def reward_model(run: Run, out: Path) -> dict:
    prefs, preset = run.path("preferences"), run.preset
    stage = RMConfig(
        model=str(run.path("sft")),
        data=str(prefs / "preferences.jsonl"),
        output=str(out),
        max_steps=preset.rm_steps,
        batch_size=preset.rm_batch_size,
        learning_rate=preset.rm_learning_rate,
        ensemble=preset.rm_ensemble,
        save_steps=0,  # no eval_data: reward_model_accuracy below scores the held-out pairs against labels and truth
        logging_steps=25,
        seed=run.seed,
        overwrite=True,
    )
    run_rm(validated(stage))
    held_out, truth = (read_jsonl(prefs / name) for name in ("preferences_eval.jsonl", "preferences_gold.jsonl"))
    scored = out / "member-0" if preset.rm_ensemble > 1 else out  # an ensemble is scored by its first member
    found = evaluation.reward_model_accuracy(scored, held_out, run.lab.by_text(), run.lab.world)
    ranked = evaluation.prefers_chosen(scored, truth)  # every training pair, labelled or not: where PPO samples
    accuracy = sum(ranked) / len(ranked) if ranked else None
    return found | {"accuracy_vs_gold_train": accuracy, "pairs_train": len(truth)}


GOLD_MODULE = """\"\"\"The lab's gold judge as a reward function, for any RL stage: --gold-reward THIS_FILE:gold\"\"\"

from pathlib import Path

from posttrain.lab.pipeline import gold_reward_of

gold = gold_reward_of(Path(__file__).resolve().parent.parent)
"""


def gold_reward_of(run: Path):
    """The gold reward of the lab run in ``run`` (its world, from lab.json): ``f(prompts, completions) -> floats``."""
    settings = json.loads((run / "lab.json").read_text())
    lab = make_lab(Preset(**settings["preset_values"]), settings["seed"])
    by_text = lab.by_text()

    def reward(prompts: list[list[dict]], completions: list[str]) -> list[float]:
        questions = [by_text[p[0]["content"]] for p in prompts]
        return [gold.gold_reward(gold.judge(q, c, lab.world)) for q, c in zip(questions, completions, strict=True)]

    return reward


def ppo(run: Run, out: Path) -> dict:
    """PPO against the reward model, watched by the gold judge (--gold-reward): every rollout is
    scored by it and written to samples.jsonl; the over-optimisation detector follows it."""
    preset, data = run.preset, run.path("data")
    (data / "gold.py").write_text(GOLD_MODULE)
    stage = PPOConfig(
        model=str(run.path("sft")),
        prompts=str(data / "prompts.jsonl"),
        reward=str(run.path("rm")),
        gold_reward=f"{data / 'gold.py'}:gold",
        ensemble_aggregate=preset.ppo_ensemble_aggregate,
        stop_on_overoptimisation=preset.ppo_stop_on_overoptimisation,
        output=str(out),
        max_steps=preset.ppo_steps,
        rollout_prompts=preset.ppo_rollout_prompts,
        batch_size=preset.ppo_batch_size,
        ppo_epochs=preset.ppo_epochs,
        max_new_tokens=preset.max_new_tokens,
        temperature=preset.ppo_temperature,
        learning_rate=preset.ppo_learning_rate,
        kl_coef=preset.ppo_kl_coef,
        sample_steps=1,
        samples_per_log=preset.ppo_rollout_prompts,
        save_steps=0,
        seed=run.seed,
        overwrite=True,
    )
    run_ppo(validated(stage))
    overoptimisation = json.loads((out / "overoptimisation.json").read_text())
    return {"trajectory": gold_trajectory(out, run.lab), "overoptimisation": overoptimisation}


def gold_trajectory(run: Path, lab: Lab) -> list[dict[str, float]]:
    """Per PPO iteration: the proxy score, the KL and its root, the gold reward (the run's own
    ``objective/gold``), and from the gold judge's labels of its rollouts the hallucination rate
    (all answers; unknowable questions) and abstention on known questions."""
    by_text = lab.by_text()
    metrics = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    steps: dict[int, list[tuple[world.Question, gold.Judgement]]] = {}
    for row in map(json.loads, (run / "samples.jsonl").read_text().splitlines()):
        question = by_text[row["prompt"][0]["content"]]
        steps.setdefault(row["step"], []).append((question, gold.judge(question, row["completion"], lab.world)))
    keys = {"proxy": "objective/scores", "kl": "objective/kl", "sqrt_kl": "objective/sqrt_kl", "gold": "objective/gold"}
    return [
        {"step": step} | {name: metrics[step][key] for name, key in keys.items()} | evaluation.rollout_metrics(judged)
        for step, judged in sorted(steps.items())
    ]


def dpo(run: Run, out: Path) -> dict:
    preset = run.preset
    stage = DPOConfig(
        model=str(run.path("sft")),
        data=str(run.path("preferences") / "preferences.jsonl"),
        output=str(out),
        max_steps=preset.dpo_steps,
        batch_size=preset.dpo_batch_size,
        learning_rate=preset.dpo_learning_rate,
        beta=preset.dpo_beta,
        save_steps=0,
        logging_steps=10,
        seed=run.seed,
        overwrite=True,
    )
    run_dpo(validated(stage))
    return {}


def evaluate(run: Run, out: Path) -> dict:
    """Every model of ``run.evaluated`` answers the evaluation questions; the gold judge scores them."""
    questions = load_questions(run.path("data") / "evaluation.jsonl")
    models = {name: run.path(name) for name in run.evaluated}
    return evaluation.evaluate(out, models, run.path("sft"), questions, run.lab.world, run.preset, run.seed)


# The lab, in order. Seconds: the quick preset alone on a 2-core AVX2 host (bench/lab_times.py).
STEPS = [
    Step("data", make_data, needs=(), seconds=1),
    Step("base", pretrain, needs=("data",), seconds=109),
    Step("sft", finetune, needs=("base", "data"), seconds=31),
    Step("preferences", preferences, needs=("sft", "data"), seconds=11, reads_labels=True),
    Step("rm", reward_model, needs=("sft", "preferences"), seconds=41),
    Step("ppo", ppo, needs=("sft", "rm", "data"), seconds=59),
    Step("dpo", dpo, needs=("sft", "preferences"), seconds=13),
    Step("evaluate", evaluate, needs=("data", "base", "sft", "ppo", "dpo"), seconds=10),
]


def lab_settings(config: LabConfig) -> dict[str, Any]:
    """What makes a run what it is (lab.json): the preset, its values, the seed and the pool."""
    keys = ("preset", "seed", "annotators")
    return {key: getattr(config, key) for key in keys} | {"preset_values": asdict(config.resolved())}


def reuse_shared_steps(source: Path, out: Path, settings: dict[str, Any]) -> None:
    """Copy the shared steps that ``source`` finished and ``out`` lacks; ``source`` must be a lab run
    with the same settings apart from the annotator pool."""
    if not (source / "lab.json").is_file():
        raise UserError(f"--reuse {source}: not a lab run (no lab.json)")
    theirs = json.loads((source / "lab.json").read_text())
    if {**theirs, "annotators": None} != {**settings, "annotators": None}:
        raise UserError(f"--reuse {source}: a lab run with another preset or seed (see its lab.json)")
    for name in shared_steps(STEPS):
        if (source / name / STEP_FILE).is_file() and not (out / name).exists():
            shutil.copytree(source / name, out / name)
            log.info("lab: %s copied from %s", name, source)


def start_run(out: Path, settings: dict[str, Any], what: str = "lab run") -> None:
    """Claim ``out`` for a run with ``settings`` (lab.json), or check it holds one with the same settings."""
    if out.is_dir() and any(out.iterdir()) and not (out / "lab.json").is_file():
        raise UserError(f"--output {out}: holds something other than a {what}; choose an empty or new directory")
    if (out / "lab.json").is_file() and json.loads((out / "lab.json").read_text()) != settings:
        raise UserError(f"--output {out}: holds a {what} with other settings (see its lab.json); use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(settings, indent=2))


def run_lab(config: LabConfig) -> Path:
    """Run (or resume) every step, holding the lock on OUTPUT (one lab run writes to it); returns OUTPUT."""
    preset, out = config.resolved(), Path(config.output)
    lock = Lock(out.absolute(), config.output)
    try:
        start_run(out, lab_settings(config))
        if config.reuse:
            reuse_shared_steps(Path(config.reuse), out, lab_settings(config))
        run = Run(out, preset, config.seed, config.annotators, make_lab(preset, config.seed))
        run_steps(run, STEPS, Progress(expected_seconds(config.preset)))
        write_summary(out, config)
        write_report(out)
    finally:
        lock.release()
    return out


def expected_seconds(preset: str) -> dict[str, float]:
    """Each step's usual seconds: as measured for the quick preset, scaled for the others."""
    scale = {"quick": 1.0, "full": 3.0, "smoke": 0.02}[preset]
    return {s.name: s.seconds * scale for s in STEPS}


def gold_arc(trajectory: list[dict]) -> dict[str, float]:
    """The rollouts' gold reward over PPO, averaged over an eighth of the iterations at a time:
    its start, peak (and the iteration where the peak's window starts) and end."""
    shape = evaluation.arc([row["gold"] for row in trajectory], max(1, len(trajectory) // 8))
    peak = shape.pop("peak_index")
    return {**shape, "peak_step": trajectory[peak]["step"]}


EVALUATION_KEYS = ("evaluation_questions", "evaluation_facts", "evaluation_unknowable")


def write_summary(out: Path, config: LabConfig) -> None:
    """summary.json: every number of the run under stable keys (the report reads it)."""
    trajectory = record(out / "ppo")["trajectory"]
    summary = {
        "seed": config.seed,
        "preset": config.preset,
        "models": record(out / "evaluate")["models"],
        "evaluation": {key: record(out / "data")[key] for key in EVALUATION_KEYS},
        "annotators": record(out / "preferences"),
        "reward_model": record(out / "rm"),
        "ppo": {
            "trajectory": trajectory,
            "gold_arc": gold_arc(trajectory),
            "overoptimisation": record(out / "ppo")["overoptimisation"],
        },
        "seconds": {s.name: record(out / s.name)["seconds"] for s in STEPS},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
