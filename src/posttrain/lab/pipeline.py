"""The lab's pipeline, step by step, through the same stage functions as the CLI.

  data         the world, its document corpus, demonstrations, prompts and held-out questions
  base         a BPE tokenizer trained on the corpus and a small Llama pre-trained on it (a
               document completer: the SFT stage on ``text`` rows is plain language modelling)
  sft          supervised fine-tuning on the careful demonstrations
  preferences  several sampled answers per training prompt from the SFT model, pairs labelled by
               the simulated annotator pool (with annotator ids; a share labelled three times)
  rm           a reward model on those labels
  evaluate     every model so far answers the held-out questions; the gold judge scores them

Each step writes under ``OUTPUT/<step>/`` and marks itself done last (``step.json``), so a
finished step is skipped and an interrupted run resumes at the step it stopped in. The PPO and
DPO steps and the report are yet to come.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.lab import annotators as ann
from posttrain.lab import gold, world
from posttrain.models.factory import build_llama, train_tokenizer
from posttrain.stages.dpo import DPOConfig, run_dpo
from posttrain.stages.ppo import PPOConfig, run_ppo
from posttrain.stages.rm import RMConfig, run_rm
from posttrain.stages.sft import SFTConfig, run_sft
from posttrain.training.rollout import sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    n_towns: int = 40
    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 4
    pretrain_steps: int = 600
    sft_steps: int = 150
    sft_learning_rate: float = 1e-3
    samples_per_prompt: int = 4
    rm_steps: int = 150
    ppo_steps: int = 80
    ppo_learning_rate: float = 5e-5
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
    ),
    "full": Preset(n_towns=80, hidden_size=192, pretrain_steps=1500, sft_steps=300, rm_steps=300, ppo_steps=200),
}
STEP_FILE = "step.json"


@dataclass(frozen=True)
class LabConfig:
    output: str
    preset: str = "quick"
    seed: int = 0
    annotators: str = "biased"  # "biased" or "careful" (see lab/annotators.py)

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


def step(name: str, directory: Path, run) -> dict[str, Any]:
    """Run one step unless ``directory/step.json`` says it finished; returns what the step recorded."""
    marker = directory / name / STEP_FILE
    if marker.is_file():
        log.info("lab: %s already done (%s)", name, marker.parent)
        return json.loads(marker.read_text())
    start = time.perf_counter()
    log.info("lab: %s ...", name)
    record = run(directory / name) or {}
    record["seconds"] = round(time.perf_counter() - start, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2))
    log.info("lab: %s done in %.0f s", name, record["seconds"])
    return record


def make_data(out: Path, the_world: world.World, config: LabConfig) -> dict:
    all_questions = world.questions(the_world, config.seed)
    train, held_out = world.split_questions(all_questions, config.seed)
    write_jsonl(out / "corpus.jsonl", [{"text": d} for d in world.pretraining_corpus(the_world, config.seed)])
    write_jsonl(out / "sft.jsonl", world.demonstrations(the_world, train, config.seed))
    write_jsonl(out / "prompts.jsonl", world.prompt_rows(train))
    write_jsonl(out / "held_out.jsonl", [asdict(q) for q in held_out])
    return {"train_questions": len(train), "held_out_questions": len(held_out)}


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


@torch.no_grad()
def answers(model_dir: Path, prompts: list[list[dict]], k: int, greedy: bool, seed: int) -> list[list[str]]:
    """``k`` answers per prompt, batched with the KV cache (greedy, or sampled at temperature 1)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    settings = SamplingSettings(temperature=0.0 if greedy else 1.0, top_p=1.0, max_new_tokens=24)
    ids = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for p in prompts]  # fmt: skip
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(ids), 32):
        chunk = [i for i in ids[start : start + 32] for _ in range(k)]
        rollout = sample(model, chunk, tokenizer, settings)
        kept = [r[m.bool()] for r, m in zip(rollout.responses, rollout.response_mask, strict=True)]
        texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
        for j, text in enumerate(texts):
            out[start + j // k].append(text)
    return out


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    max_new_tokens: int


def preferences(out: Path, sft: Path, data: Path, preset: Preset, the_world: world.World, config: LabConfig) -> dict:
    """Sample answers, pair them, let the annotator pool label the pairs (a quarter three times)."""
    rows = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    by_id = {q.id: q for q in world.questions(the_world, config.seed)}
    sampled = answers(sft, [r["prompt"] for r in rows], preset.samples_per_prompt, greedy=False, seed=config.seed)
    rng, pairs = random.Random(config.seed), []
    for row, texts in zip(rows, sampled, strict=True):
        question = by_id[row["question_id"]]
        distinct = list(dict.fromkeys(texts))
        rng.shuffle(distinct)
        for a, b in zip(distinct[::2], distinct[1::2], strict=False):
            ja, jb = gold.judge(question, a, the_world), gold.judge(question, b, the_world)
            judged = [ann.Judged(j.label, j.confident, j.n_words) for j in (ja, jb)]
            pairs.append((row["prompt"], a, judged[0], b, judged[1], question.id))
    labelled = ann.label_pairs(pairs, ann.pool(config.annotators, seed=config.seed), overlap=0.25, seed=config.seed)
    golds = {i: ann.gold_preference(gold.gold_reward(gold.judge(by_id[p[5]], p[1], the_world)),
                                    gold.gold_reward(gold.judge(by_id[p[5]], p[3], the_world)))
             for i, p in enumerate(pairs)}  # fmt: skip
    write_jsonl(out / "preferences.jsonl", labelled)
    return {"pairs": len(pairs), "labels": len(labelled), "agreement": ann.agreement(labelled),
            "agreement_with_gold": ann.gold_agreement(labelled, golds)}  # fmt: skip


def reward_model(out: Path, sft: Path, prefs: Path, preset: Preset, config: LabConfig) -> dict:
    stage = RMConfig(
        model=str(sft),
        data=str(prefs / "preferences.jsonl"),
        output=str(out),
        max_steps=preset.rm_steps,
        batch_size=16,
        learning_rate=1e-4,
        eval_split=0.1,
        save_steps=0,
        logging_steps=25,
        seed=config.seed,
        overwrite=True,
    )
    run_rm(validated(stage))
    return {}


def ppo(out: Path, sft: Path, rm: Path, data: Path, preset: Preset, the_world: world.World, config: LabConfig) -> dict:
    """PPO against the reward model; every rollout is written to samples.jsonl and scored by the gold judge."""
    stage = PPOConfig(
        model=str(sft),
        prompts=str(data / "prompts.jsonl"),
        reward=str(rm),
        output=str(out),
        max_steps=preset.ppo_steps,
        rollout_prompts=16,
        batch_size=16,
        ppo_epochs=2,
        max_new_tokens=24,
        temperature=1.0,
        learning_rate=preset.ppo_learning_rate,
        kl_coef=preset.ppo_kl_coef,
        sample_steps=1,
        samples_per_log=16,
        save_steps=0,
        seed=config.seed,
        overwrite=True,
    )
    run_ppo(validated(stage))
    return {"trajectory": gold_trajectory(out, the_world, config)}


def gold_trajectory(run: Path, the_world: world.World, config: LabConfig) -> list[dict[str, float]]:
    """Per PPO iteration: the proxy score, the gold reward and hallucination rate of its rollouts, and the KL."""
    by_text = {q.text: q for q in world.questions(the_world, config.seed)}
    metrics = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    steps: dict[int, list[gold.Judgement]] = {}
    for row in map(json.loads, (run / "samples.jsonl").read_text().splitlines()):
        question = by_text[row["prompt"][0]["content"]]
        steps.setdefault(row["step"], []).append(gold.judge(question, row["completion"], the_world))
    return [
        {"step": step, "proxy": metrics[step]["objective/scores"], "kl": metrics[step]["objective/kl"],
         "gold": sum(gold.gold_reward(j) for j in judged) / len(judged),
         "hallucination_rate": sum(j.label == "hallucinated" for j in judged) / len(judged)}
        for step, judged in sorted(steps.items())
    ]  # fmt: skip


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


def evaluate(out: Path, models: dict[str, Path], data: Path, the_world: world.World, config: LabConfig) -> dict:
    """Greedy answers of every model to the held-out questions, scored by the gold judge."""
    held_out = load_questions(data)
    prompts = [[{"role": "user", "content": q.text}] for q in held_out]
    results, samples = {}, {}
    for name, directory in models.items():
        texts = [a[0] for a in answers(directory, prompts, 1, greedy=True, seed=config.seed)]
        judged = [gold.judge(q, t, the_world) for q, t in zip(held_out, texts, strict=True)]
        results[name] = model_metrics(held_out, judged)
        rows = zip(held_out, texts, judged, strict=True)
        samples[name] = [{"question": q.text, "answer": t, "label": j.label} for q, t, j in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    return {"models": results}


def model_metrics(questions: list[world.Question], judged: list[gold.Judgement]) -> dict[str, float]:
    def share(label: str, known: bool | None) -> float:
        chosen = [j for q, j in zip(questions, judged, strict=True) if known is None or q.known == known]
        return sum(j.label == label for j in chosen) / max(len(chosen), 1)

    return {
        "gold_reward": sum(gold.gold_reward(j) for j in judged) / len(judged),
        "accuracy_known": share("correct", True),
        "abstain_unknowable": share("abstained", False),
        "hallucination_rate": share("hallucinated", None),
        "hallucination_unknowable": share("hallucinated", False),
        "format_compliance": 1 - share("malformed", None),
        "mean_length": sum(j.n_words for j in judged) / len(judged),
    }


def run_lab(config: LabConfig) -> Path:
    """Run (or resume) every step; returns OUTPUT."""
    preset, out = config.resolved(), Path(config.output)
    if out.is_dir() and any(out.iterdir()) and not (out / "lab.json").is_file():
        raise UserError(f"--output {out}: holds something other than a lab run; choose an empty or new directory")
    settings = asdict(config) | {"preset_values": asdict(preset)}
    if (out / "lab.json").is_file() and json.loads((out / "lab.json").read_text()) != settings:
        raise UserError(f"--output {out}: holds a lab run with other settings (see its lab.json); use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(settings, indent=2))
    the_world = world.make_world(config.seed, n_towns=preset.n_towns)
    step("data", out, lambda d: make_data(d, the_world, config))
    step("base", out, lambda d: pretrain(d, out / "data", preset, config))
    step("sft", out, lambda d: finetune(d, out / "base", out / "data", preset, config))
    step("preferences", out, lambda d: preferences(d, out / "sft", out / "data", preset, the_world, config))
    step("rm", out, lambda d: reward_model(d, out / "sft", out / "preferences", preset, config))
    step("ppo", out, lambda d: ppo(d, out / "sft", out / "rm", out / "data", preset, the_world, config))
    step("dpo", out, lambda d: dpo(d, out / "sft", out / "preferences", preset, config))
    models = {name: out / name for name in ("base", "sft", "ppo", "dpo")}
    summary = step("evaluate", out, lambda d: evaluate(d, models, out / "data", the_world, config))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
