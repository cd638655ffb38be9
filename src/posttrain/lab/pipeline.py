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
  evaluate     every model answers the held-out questions; the gold judge scores them; KL to SFT

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
from posttrain.lab.report import write_report
from posttrain.lab.report_audit import audit_summary
from posttrain.lab.steps import EXPECTED_SECONDS, STEP_FILE, STEPS, Progress, step
from posttrain.models.factory import build_llama, train_tokenizer
from posttrain.stages.dpo import DPOConfig, run_dpo
from posttrain.stages.ppo import PPOConfig, run_ppo
from posttrain.stages.rm import RMConfig, run_rm
from posttrain.stages.sft import SFTConfig, run_sft
from posttrain.training.output import Lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    n_towns: int = 40
    unknowable_share: float = 0.15  # of the facts about towns in the corpus
    unseen_share: float = 0.25  # of the towns, in no document at all
    n_arithmetic: int = 30
    demonstrated_share: float = 1.0  # of the training questions, those with SFT demonstrations
    unsure_share: float = 0.8  # of known facts, also given to a writer who abstained (world.demonstrations)
    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 4
    pretrain_steps: int = 600
    sft_steps: int = 300
    sft_learning_rate: float = 1e-3
    samples_per_prompt: int = 16
    pairs_per_prompt: int = 28
    rm_steps: int = 150
    rm_learning_rate: float = 3e-4
    ppo_steps: int = 80
    ppo_rollout_prompts: int = 32
    ppo_temperature: float = 0.7
    ppo_learning_rate: float = 2.5e-5
    ppo_kl_coef: float = 0.05
    dpo_steps: int = 60
    dpo_learning_rate: float = 1e-4


PRESETS = {
    "quick": Preset(),
    # seconds, not minutes: checks that every step runs and chains, shows nothing (tests use it)
    "smoke": Preset(
        n_towns=8,
        hidden_size=32,
        num_layers=2,
        vocab_size=400,
        pretrain_steps=10,
        sft_steps=5,
        rm_steps=4,
        ppo_steps=2,
        dpo_steps=2,
        samples_per_prompt=2,
        pairs_per_prompt=1,
        ppo_rollout_prompts=8,
    ),
    "full": Preset(
        n_towns=80,
        hidden_size=192,
        pretrain_steps=1500,
        sft_steps=300,
        rm_steps=250,
        ppo_steps=200,
        ppo_learning_rate=5e-5,  # at 2.5e-5 this bigger model hardly exploited its reward model in 200 iterations
    ),
}
SHARED_STEPS = ("data", "base", "sft")  # the same for every annotator pool, given the preset and seed


@dataclass(frozen=True)
class Lab:
    """The world of a run and every question asked about it."""

    world: world.World
    questions: list[world.Question]

    def by_text(self) -> dict[str, world.Question]:
        return {q.text: q for q in self.questions}


def make_lab(preset: Preset, seed: int) -> Lab:
    """The world a preset and seed describe, and every question about it."""
    the_world = world.make_world(seed, preset.n_towns, preset.unknowable_share, preset.unseen_share)
    return Lab(the_world, world.questions(the_world, seed, n_arithmetic=preset.n_arithmetic))


@dataclass(frozen=True)
class LabConfig:
    output: str
    preset: str = "quick"
    seed: int = 0
    annotators: str = "biased"  # "biased" or "careful" (see lab/annotators.py)
    reuse: str = ""  # another lab run whose annotator-independent steps (SHARED_STEPS) are copied

    def resolved(self) -> Preset:
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset}: unknown preset; valid presets: {', '.join(PRESETS)}")
        if self.annotators not in ann.PRESETS:
            raise UserError(f"--annotators {self.annotators}: unknown pool; valid pools: {', '.join(ann.PRESETS)}")
        return PRESETS[self.preset]


def validated(config):
    """A stage config checked as the CLI checks it (``validate`` also fills derived fields)."""
    config.validate()
    return config


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(out: Path, lab: Lab, preset: Preset, config: LabConfig) -> dict:
    """The questions, split: held-out ones for the evaluation; the rest are the prompts of the
    preference pairs and of PPO, and ``demonstrated_share`` of them have SFT demonstrations
    (the others are questions the SFT model has never been shown an answer to)."""
    train, held_out = world.split_questions(lab.questions, config.seed)
    sft, _ = world.split_questions(train, config.seed + 1, held_out=1 - preset.demonstrated_share)
    write_jsonl(out / "corpus.jsonl", [{"text": d} for d in world.pretraining_corpus(lab.world, config.seed)])
    write_jsonl(out / "sft.jsonl", world.demonstrations(lab.world, sft, config.seed, unsure=preset.unsure_share))
    write_jsonl(out / "prompts.jsonl", world.prompt_rows(train))
    write_jsonl(out / "held_out.jsonl", [asdict(q) for q in held_out])
    return {"sft_questions": len(sft), "prompt_questions": len(train), "held_out_questions": len(held_out)}


def pretrain(out: Path, data: Path, preset: Preset, config: LabConfig) -> dict:
    """A tokenizer trained on the corpus, a random Llama, then language modelling on the corpus."""
    texts = [json.loads(line)["text"] for line in (data / "corpus.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=preset.vocab_size)
    init = out.parent / "init"
    build_llama(tokenizer, preset.hidden_size, preset.num_layers, num_heads=4, num_kv_heads=2, max_positions=512,
                seed=config.seed).save_pretrained(init)  # fmt: skip
    tokenizer.save_pretrained(init)
    corpus = str(data / "corpus.jsonl")
    stage = SFTConfig(
        model=str(init),
        data=corpus,
        output=str(out),
        max_steps=preset.pretrain_steps,
        batch_size=16,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        max_length=128,
        packing=True,
        save_steps=0,
        logging_steps=50,
        seed=config.seed,
        overwrite=True,
    )
    run_sft(validated(stage))
    return {}


def finetune(out: Path, base: Path, data: Path, preset: Preset, config: LabConfig) -> dict:
    stage = SFTConfig(
        model=str(base),
        data=str(data / "sft.jsonl"),
        output=str(out),
        max_steps=preset.sft_steps,
        batch_size=16,
        learning_rate=preset.sft_learning_rate,
        lr_scheduler="cosine",
        save_steps=0,
        logging_steps=25,
        seed=config.seed,
        overwrite=True,
    )
    run_sft(validated(stage))
    return {}


def load_questions(data: Path) -> list[world.Question]:
    return [world.Question(**json.loads(line)) for line in (data / "held_out.jsonl").read_text().splitlines()]


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
            views = [ann.Judged(j.label, j.confident, j.n_words) for j in judged]
            pairs.append((row["prompt"], a, views[0], b, views[1], question.id))
    return pairs


def preferences(out: Path, sft: Path, data: Path, preset: Preset, lab: Lab, config: LabConfig) -> dict:
    """Sample answers, pair them, let the annotator pool label the pairs (a quarter three times).

    The training prompts' pairs go to ``preferences.jsonl``; the held-out questions' pairs, labelled
    the same way, to ``preferences_eval.jsonl``, to measure the reward model on questions it never saw.
    """
    train = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    rows = train + world.prompt_rows(load_questions(data))
    the_world, by_id = lab.world, {q.id: q for q in lab.questions}
    sampled = evaluation.answers(sft, [r["prompt"] for r in rows], preset.samples_per_prompt, False, config.seed)
    pairs = sample_pairs(rows, sampled, by_id, the_world, preset.pairs_per_prompt, config.seed)
    labelled = ann.label_pairs(pairs, ann.pool(config.annotators, seed=config.seed), overlap=0.25, seed=config.seed)
    golds: dict[int, int | None] = {}  # pair id -> 0 or 1 (the response the truth prefers), None on a tie
    for i, (_, _, view_a, _, view_b, _) in enumerate(pairs):  # the views carry what the gold reward reads
        judged = [gold.Judgement(v.label, v.confident, v.n_words) for v in (view_a, view_b)]
        preferred = gold.gold_preference(*judged)
        golds[i] = None if preferred == -1 else preferred
    labelled = ann.with_gold(labelled, golds)
    train_ids = {r["question_id"] for r in train}
    held = {i for i, p in enumerate(pairs) if p[5] not in train_ids}
    write_jsonl(out / "preferences.jsonl", [r for r in labelled if r["pair_id"] not in held])
    write_jsonl(out / "preferences_eval.jsonl", [r for r in labelled if r["pair_id"] in held])
    audit = audit_rows(labelled, "the lab's labelled pairs", seed=config.seed)
    write_audit(audit, out)  # audit.json, audit.html: the same audit as `posttrain audit` on these rows
    return {"preset": config.annotators, "pairs": len(pairs), "labels": len(labelled),
            "agreement": ann.agreement(labelled),
            "agreement_untied": ann.agreement(labelled, {i for i, g in golds.items() if g is not None}),
            "agreement_with_gold": ann.gold_agreement(labelled), "audit": audit_summary(audit)}  # fmt: skip


def reward_model(out: Path, sft: Path, prefs: Path, preset: Preset, lab: Lab, config: LabConfig) -> dict:
    stage = RMConfig(
        model=str(sft),
        data=str(prefs / "preferences.jsonl"),
        output=str(out),
        max_steps=preset.rm_steps,
        batch_size=8,  # prompts per batch, each with all its labelled pairs
        learning_rate=preset.rm_learning_rate,
        eval_data=str(prefs / "preferences_eval.jsonl"),
        save_steps=0,
        logging_steps=25,
        seed=config.seed,
        overwrite=True,
    )
    run_rm(validated(stage))
    held_out = [json.loads(line) for line in (prefs / "preferences_eval.jsonl").read_text().splitlines()]
    return evaluation.reward_model_accuracy(out, held_out, lab.by_text(), lab.world)


GOLD_MODULE = '''"""The lab's gold judge as a reward function, for any RL stage: --gold-reward THIS_FILE:gold"""

from pathlib import Path

from posttrain.lab.pipeline import gold_reward_of

gold = gold_reward_of(Path(__file__).resolve().parent.parent)
'''


def gold_reward_of(run: Path):
    """The gold reward of the lab run in ``run`` (its world, from lab.json): ``f(prompts, completions) -> floats``."""
    settings = json.loads((run / "lab.json").read_text())
    lab = make_lab(Preset(**settings["preset_values"]), settings["seed"])
    by_text = lab.by_text()

    def reward(prompts: list[list[dict]], completions: list[str]) -> list[float]:
        questions = [by_text[p[0]["content"]] for p in prompts]
        return [gold.gold_reward(gold.judge(q, c, lab.world)) for q, c in zip(questions, completions, strict=True)]

    return reward


def ppo(out: Path, sft: Path, rm: Path, data: Path, preset: Preset, lab: Lab, config: LabConfig) -> dict:
    """PPO against the reward model, watched by the gold judge (--gold-reward): every rollout is
    scored by it and written to samples.jsonl; the over-optimisation detector follows it."""
    (data / "gold.py").write_text(GOLD_MODULE)
    stage = PPOConfig(
        model=str(sft),
        prompts=str(data / "prompts.jsonl"),
        reward=str(rm),
        gold_reward=f"{data / 'gold.py'}:gold",
        output=str(out),
        max_steps=preset.ppo_steps,
        rollout_prompts=preset.ppo_rollout_prompts,
        batch_size=min(16, preset.ppo_rollout_prompts),
        ppo_epochs=2,
        max_new_tokens=24,
        temperature=preset.ppo_temperature,
        learning_rate=preset.ppo_learning_rate,
        kl_coef=preset.ppo_kl_coef,
        sample_steps=1,
        samples_per_log=preset.ppo_rollout_prompts,
        save_steps=0,
        seed=config.seed,
        overwrite=True,
    )
    run_ppo(validated(stage))
    overoptimisation = json.loads((out / "overoptimisation.json").read_text())
    return {"trajectory": gold_trajectory(out, lab), "overoptimisation": overoptimisation}


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


def dpo(out: Path, sft: Path, prefs: Path, preset: Preset, config: LabConfig) -> dict:
    stage = DPOConfig(
        model=str(sft),
        data=str(prefs / "preferences.jsonl"),
        output=str(out),
        max_steps=preset.dpo_steps,
        batch_size=16,
        learning_rate=preset.dpo_learning_rate,
        precompute_ref=True,
        cache_dir=str(out.parent / "cache"),
        save_steps=0,
        logging_steps=10,
        seed=config.seed,
        overwrite=True,
    )
    run_dpo(validated(stage))
    return {}


def lab_settings(config: LabConfig) -> dict[str, Any]:
    """What makes a run what it is (lab.json): the preset, its values, the seed and the pool."""
    keys = ("preset", "seed", "annotators")
    return {key: getattr(config, key) for key in keys} | {"preset_values": asdict(config.resolved())}


def reuse_shared_steps(source: Path, out: Path, settings: dict[str, Any]) -> None:
    """Copy SHARED_STEPS that ``source`` finished and ``out`` lacks; ``source`` must be a lab run
    with the same settings apart from the annotator pool."""
    if not (source / "lab.json").is_file():
        raise UserError(f"--reuse {source}: not a lab run (no lab.json)")
    theirs = json.loads((source / "lab.json").read_text())
    if {**theirs, "annotators": None} != {**settings, "annotators": None}:
        raise UserError(f"--reuse {source}: a lab run with another preset or seed (see its lab.json)")
    for name in SHARED_STEPS:
        if (source / name / STEP_FILE).is_file() and not (out / name).exists():
            shutil.copytree(source / name, out / name)
            log.info("lab: %s copied from %s", name, source)


def run_lab(config: LabConfig) -> Path:
    """Run (or resume) every step, holding the lock on OUTPUT (one lab run writes to it); returns OUTPUT."""
    preset, out = config.resolved(), Path(config.output)
    lock = Lock(out.absolute(), config.output)
    try:
        run_steps(config, preset, out)
    finally:
        lock.release()
    return out


def run_steps(config: LabConfig, preset: Preset, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()) and not (out / "lab.json").is_file():
        raise UserError(f"--output {out}: holds something other than a lab run; choose an empty or new directory")
    settings = lab_settings(config)
    if (out / "lab.json").is_file() and json.loads((out / "lab.json").read_text()) != settings:
        raise UserError(f"--output {out}: holds a lab run with other settings (see its lab.json); use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(settings, indent=2))
    if config.reuse:
        reuse_shared_steps(Path(config.reuse), out, settings)
    lab = make_lab(preset, config.seed)
    progress = Progress(EXPECTED_SECONDS[config.preset])

    def run_step(name: str, run) -> None:
        step(name, out, run, progress)

    run_step("data", lambda d: make_data(d, lab, preset, config))
    run_step("base", lambda d: pretrain(d, out / "data", preset, config))
    run_step("sft", lambda d: finetune(d, out / "base", out / "data", preset, config))
    run_step("preferences", lambda d: preferences(d, out / "sft", out / "data", preset, lab, config))
    run_step("rm", lambda d: reward_model(d, out / "sft", out / "preferences", preset, lab, config))
    run_step("ppo", lambda d: ppo(d, out / "sft", out / "rm", out / "data", preset, lab, config))
    run_step("dpo", lambda d: dpo(d, out / "sft", out / "preferences", preset, config))
    models = {name: out / name for name in ("base", "sft", "ppo", "dpo")}
    held_out = load_questions(out / "data")
    run_step("evaluate", lambda d: evaluation.evaluate(d, models, held_out, lab.world, config.seed))
    write_summary(out, config)
    write_report(out)


def gold_arc(trajectory: list[dict]) -> dict[str, float]:
    """The rollouts' gold reward over PPO, averaged over an eighth of the iterations at a time:
    its start, peak (and the iteration where the peak's window starts) and end."""
    shape = evaluation.arc([row["gold"] for row in trajectory], max(1, len(trajectory) // 8))
    peak = shape.pop("peak_index")
    return {**shape, "peak_step": trajectory[peak]["step"]}


def write_summary(out: Path, config: LabConfig) -> None:
    """summary.json: every number of the run under stable keys (the report reads it)."""

    def record(name: str) -> dict:
        return json.loads((out / name / STEP_FILE).read_text())

    trajectory = record("ppo")["trajectory"]
    summary = {
        "seed": config.seed,
        "preset": config.preset,
        "models": record("evaluate")["models"],
        "annotators": record("preferences"),
        "reward_model": record("rm"),
        "ppo": {
            "trajectory": trajectory,
            "gold_arc": gold_arc(trajectory),
            "overoptimisation": record("ppo")["overoptimisation"],
        },
        "seconds": {name: record(name)["seconds"] for name in STEPS},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
