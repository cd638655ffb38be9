"""No option is accepted and silently ignored: for every training stage, every field of its config
dataclass (every flag it accepts) either changes a tiny 2-step run (weights, metrics or files), is
refused with exit 2, or is in ``NO_VISIBLE_EFFECT`` with the reason a short run cannot show it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from accelerate.state import AcceleratorState

from conftest import WORDS, make_tiny_model, preference_rows, qa_rows, write_jsonl
from posttrain.cli import main
from posttrain.stages.dpo import DPOConfig
from posttrain.stages.grpo import GRPOConfig, RLOOConfig
from posttrain.stages.ppo import PPOConfig
from posttrain.stages.rm import RMConfig
from posttrain.stages.sft import SFTConfig

STAGES = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}
RL = ("ppo", "grpo", "rloo")

# Options that may leave a 2-step run unchanged, and why (each is checked elsewhere or cannot show here).
NO_VISIBLE_EFFECT = {
    "output": "where the run is written; every run here writes to a new directory",
    "overwrite": "replaces an existing OUTPUT; every run here writes a new one",
    "resume": "continues an interrupted run bit for bit (tests/test_fault_injection.py, tests/test_rl.py)",
    "trust_remote_code": "lets a model's own code run; the tiny model has none",
    "gradient_checkpointing": "trades compute for memory; the same numbers by design",
    "report_to": "mirrors metrics.jsonl to a tracker whose package need not be installed",
    "save_total_limit": "how many checkpoints are kept; a 2-step run writes at most one",
    "cache_dir": "where --precompute-ref keeps its cache, outside OUTPUT",
    "precompute_ref": "the reference log-probs computed once and cached: the same numbers (tests/test_dpo.py)",
    "stop_on_overoptimisation": "ends the run at an onset of hacking, which 2 iterations cannot show",
    "onset_z": "the onset threshold of the detector, which 2 iterations cannot reach",
    "sampler": "how completions are decoded: the same tokens either way by design (tests/test_sampler.py)",
    "onset_window": "the window of the detector and of the warnings, which 2 iterations do not fill",
    "kl_budget": "warns past a KL budget; the sampled KL of 2 tiny iterations is near 0, even negative",
}

# Options refused with exit 2 by a stage, whatever their value: they have nothing to act on there.
REFUSED = {
    **{(stage, "data_split"): "a local file has one split" for stage in STAGES},
    **{(stage, "eval_data"): "the RL stages take held-out prompts with --eval-prompts" for stage in RL},
    **{(stage, "eval_split"): "the RL stages take held-out prompts with --eval-prompts" for stage in RL},
    **{(stage, "lora_dropout"): "the RL stages turn dropout off" for stage in RL},
    ("ppo", "num_generations"): "PPO samples one completion per prompt",
    ("rloo", "scale_rewards"): "the leave-one-out advantage is never scaled",
}


@dataclasses.dataclass
class Files:
    model: Path
    other_model: Path
    qa: Path
    qa_other: Path
    prefs: Path
    prefs_other: Path
    unpaired: Path
    prompts: Path
    prompts_other: Path
    rules: Path
    reward_model: Path
    ensemble: Path


def base_options(stage: str, f: Files) -> dict[str, Any]:
    """The default run of each stage: 2 steps on the tiny model (RL: 2 optimizer steps per rollout,
    so that the ratio, clipping and KL terms act on the second)."""
    common = {"model": f.model, "max_steps": 2, "batch_size": 4}
    if stage == "sft":
        return common | {"data": f.qa}
    if stage in ("dpo", "rm"):
        return common | {"data": f.prefs}
    rl = common | {"prompts": f.prompts, "reward": f"{f.rules}:vowels", "batch_size": 2, "max_new_tokens": 4,
                   "learning_rate": 1e-2, "temperature": 1.0}  # fmt: skip
    return rl | ({"rollout_prompts": 4} if stage == "ppo" else {"rollout_prompts": 2, "num_generations": 2})


def flipped(value: Any) -> Any:
    return not value


# option -> (value, or a function of the base run's value; options the option needs, set in both runs)
Variant = tuple[Any, dict[str, Any]]


def variants(stage: str, f: Files) -> dict[str, Variant]:
    rl = stage in RL
    data = {"sft": f.qa_other, "dpo": f.prefs_other, "rm": f.prefs_other}.get(stage, f.prompts_other)
    max_length = {"sft": 14, "dpo": 16, "rm": 16}.get(stage, 7)
    held_out = {"eval_prompts": f.prompts_other} if rl else {"eval_split": 0.25}
    ensemble, gold = {"reward": f.ensemble}, {"gold_reward": f"{f.rules}:length", "max_steps": 3}
    return {
        # every stage
        "model": (f.other_model, {}),
        "data": (data, {"prompts": None} if rl else {}),
        "data_split": ("test", {}),
        "eval_data": (data, {}),
        "eval_split": (0.25, {}),
        "max_steps": (3, {}),
        "epochs": (2, {"max_steps": -1}),
        "batch_size": (lambda size: size * 2, {}),
        "grad_accum": (2, {}),
        "learning_rate": (3e-2, {}),
        "weight_decay": (0.5, {}),
        "adam_beta1": (0.5, {}),
        "adam_beta2": (0.5, {}),
        "adam_epsilon": (1.0, {}),
        "lr_scheduler": ("constant", {}),  # cosine and linear agree over 2 steps
        "warmup_ratio": (0.5, {}),
        "max_grad_norm": (1e-4, {}),
        "max_length": (max_length, {}),
        "truncation": ("drop", {"max_length": max_length}),
        "group_by_length": (flipped, {}),
        "seed": (1, {}),
        "data_seed": (1, {}),
        "logging_steps": (lambda steps: 2 if steps == 1 else 1, {}),
        "eval_steps": (1, held_out),
        "save_steps": (1, {}),
        "mixed_precision": ("bf16", {}),
        "lora_r": (4, {}),
        "lora_alpha": (8, {"lora_r": 4}),
        "lora_dropout": (0.5, {"lora_r": 4}),
        "lora_target_modules": ("q_proj", {"lora_r": 4}),
        # sft
        "completion_only_loss": (flipped, {}),
        "packing": (flipped, {"max_length": 16, "batch_size": 2}),  # rows of 16 tokens: enough for 2 steps
        # dpo
        "loss": ("ipo", {}),
        "beta": (0.5, {}),
        "label_smoothing": (0.2, {"loss": "cdpo"}),
        "simpo_gamma": (2.0, {"loss": "simpo"}),
        "rpo_alpha": (1.0, {}),
        "desirable_weight": (2.0, {"loss": "kto", "data": f.unpaired}),
        "undesirable_weight": (2.0, {"loss": "kto", "data": f.unpaired}),
        "ref": (f.other_model, {}),
        # rm
        "center_rewards_coefficient": (0.5, {}),
        "ensemble": (2, {}),
        "ensemble_shuffle": (flipped, {"ensemble": 2}),
        # ppo, grpo, rloo
        "prompts": (f.prompts_other, {}),
        "reward": (f"{f.rules}:length", {}),
        "rollout_prompts": (lambda n: n * 2, {}),
        "num_generations": (lambda k: k * 2, {}),
        "ppo_epochs": (lambda n: n + 1, {}),
        "max_new_tokens": (2, {}),
        "temperature": (0.5, {}),
        "top_p": (0.5, {}),
        "cliprange": (0.01, {}),
        "kl_coef": (1.0, {}),
        "missing_eos_penalty": (0.5, {}),
        "reward_clip": (0.3, {}),
        "ensemble_aggregate": ("min", ensemble),
        "ensemble_lambda": (3.0, ensemble | {"ensemble_aggregate": "mean_minus_std"}),
        "gold_reward": (f"{f.rules}:length", {}),
        "gold_every": (5, gold),  # the first and last iterations are always scored: the second shows it
        "eval_prompts": (f.prompts_other, {}),
        "sample_steps": (1, {}),
        "samples_per_log": (1, {}),
        # ppo
        "vf_coef": (1.0, {}),
        "cliprange_value": (0.01, {}),
        "gamma": (0.5, {}),
        "lam": (0.5, {}),
        "whiten_advantages": (flipped, {}),
        "kl_estimator": ("k3", {}),
        "kl_target": (0.5, {}),
        "kl_horizon": (100, {"kl_target": 0.5}),
        "value_model": ("reward", {"reward": f.reward_model}),
        # grpo, rloo
        "scale_rewards": ("batch", {}),
        "advantage": (lambda estimator: "rloo" if estimator == "grpo" else "grpo", {}),
        "loss_type": ("grpo", {"num_generations": 4}),  # groups of 4: scores that differ within a group
        "epsilon_high": (0.5, {"cliprange": 0.01, "num_generations": 4}),
        "importance_sampling_level": ("sequence", {}),
        "mask_truncated_completions": (flipped, {}),
        "overlong_buffer": (2, {}),
        "overlong_penalty": (0.5, {"overlong_buffer": 2}),
    }


RULES = """
def vowels(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]

def length(prompts, completions):
    return [len(text) / 10 for text in completions]
"""


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("options")
    rules = root / "rules.py"
    rules.write_text(RULES)
    prompts = [{"prompt": "say " + " ".join(WORDS[i : i + 1 + i % 5])} for i in range(8)]  # 1 to 5 words
    unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in preference_rows(8) for key in ("chosen", "rejected")]  # fmt: skip
    f = Files(
        model=tiny_model,
        other_model=make_tiny_model(root / "other-model", seed=1),
        qa=write_jsonl(root / "qa.jsonl", qa_rows(16)),
        qa_other=write_jsonl(root / "qa-other.jsonl", qa_rows(16, seed=1)),
        prefs=write_jsonl(root / "prefs.jsonl", preference_rows(16)),
        prefs_other=write_jsonl(root / "prefs-other.jsonl", preference_rows(16, seed=1)),
        unpaired=write_jsonl(root / "unpaired.jsonl", unpaired),
        prompts=write_jsonl(root / "prompts.jsonl", prompts),
        prompts_other=write_jsonl(root / "prompts-other.jsonl", [{"prompt": f"what is {w}"} for w in WORDS[:8]]),
        rules=rules,
        reward_model=root / "rm",
        ensemble=root / "ensemble",
    )
    for output, extra in ((f.reward_model, []), (f.ensemble, ["--ensemble", "2"])):
        assert main(["rm", "--model", str(tiny_model), "--data", str(f.prefs), "--output", str(output),
                     "--max-steps", "1", "--batch-size", "4", *extra]) == 0  # fmt: skip
    return f


def argv(stage: str, options: dict[str, Any], output: Path) -> list[str]:
    args = [stage, "--output", str(output)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def signature(output: Path) -> dict[str, Any]:
    """What a run leaves: every file's content (metrics without timings), config.yaml aside (it records
    the options themselves)."""
    found = {}
    for path in sorted(p for p in output.rglob("*") if p.is_file() and p.name != "config.yaml"):
        name = str(path.relative_to(output))
        if path.name == "metrics.jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines()]
            found[name] = [{k: v for k, v in r.items() if "per_second" not in k} for r in records]
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class Runner:
    """Runs a stage in this process; the result of each distinct option set is kept (baselines are shared)."""

    def __init__(self, stage: str, root: Path) -> None:
        self.stage, self.root, self.cache, self.count = stage, root, {}, 0

    def __call__(self, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = json.dumps({k: str(v) for k, v in options.items()}, sort_keys=True)
        if key not in self.cache:
            self.count += 1
            output = self.root / f"run-{self.count}"
            fresh = "mixed_precision" in options  # accelerate keeps one precision per process, as its own tests
            if fresh:
                AcceleratorState._reset_state(reset_partial_state=True)
            code = main(argv(self.stage, options, output))
            if fresh:
                AcceleratorState._reset_state(reset_partial_state=True)
            self.cache[key] = (code, signature(output) if code == 0 else {})
            shutil.rmtree(output, ignore_errors=True)
        return self.cache[key]


def variant_value(value: Any | Callable[[Any], Any], base: Any) -> Any:
    return value(base) if callable(value) else value


def test_every_option_of_every_stage_is_walked(tmp_path):
    """A new option needs a variant below or a reason in NO_VISIBLE_EFFECT / REFUSED."""
    f = Files(*[tmp_path] * len(dataclasses.fields(Files)))
    for stage, config in STAGES.items():
        known = variants(stage, f).keys() | NO_VISIBLE_EFFECT.keys()
        missing = [fd.name for fd in dataclasses.fields(config) if fd.name not in known]
        assert not missing, f"{stage}: options with no variant and no reason: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_accepted_option_changes_a_run_or_is_refused(stage, files, tmp_path):
    config = STAGES[stage]
    defaults = {fd.name: fd.default for fd in dataclasses.fields(config)}
    base, run = base_options(stage, files), Runner(stage, tmp_path)
    code, default_run = run(base)
    assert code == 0 and default_run["model.safetensors" if stage != "rm" else "metrics.jsonl"]
    again = Runner(stage, tmp_path / "again")(base)
    assert again == (code, default_run), "the default run is not reproducible: nothing below would mean anything"
    ignored, failures = [], []
    for name, (value, companions) in variants(stage, files).items():
        if name not in defaults or name in NO_VISIBLE_EFFECT:
            continue
        baseline = base | companions
        options = baseline | {name: variant_value(value, baseline.get(name, defaults[name]))}
        code, result = run(options)
        if (stage, name) in REFUSED:
            if code != 2:
                failures.append(f"--{name}: expected a refusal (exit 2), got exit {code}")
        elif code != 0:
            failures.append(f"--{name}: exit {code} with {options}")
        elif result == run(baseline)[1]:
            ignored.append(name)
    assert not failures, failures
    assert not ignored, f"{stage} accepts and ignores: {ignored}"
