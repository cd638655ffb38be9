"""``posttrain bon``: best-of-k sampling's proxy and gold reward against its KL, from one set of samples.

For each prompt the model samples max(--n) completions once; the proxy (``--reward``) and, if
given, the gold reward (``--gold-reward``) score each of them. For every k in ``--n`` the expected
reward of the proxy-best of k samples is estimated per prompt without bias from all the samples
(``posttrain.ops.best_of_n.best_of_k``), averaged over prompts with a 95% bootstrap interval over
prompts, and set against KL_bon(k) = ln k − (k − 1)/k. With at least 3 values of k, Gao et al.'s
best-of-n form c + d·(α − β·d), d = √KL_bon, is fitted to both curves. Writes OUTPUT/bon.json,
OUTPUT/bon.png and OUTPUT/config.yaml; docs/bon.md describes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from posttrain import config as config_io
from posttrain.config import option, require
from posttrain.errors import UserError
from posttrain.ops.best_of_n import best_of_ks, kl_bon
from posttrain.ops.overoptimisation import fit_curve, predict

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999


@dataclass
class BonConfig:
    model: str = option("", "the policy to sample from: a local directory or a hub id")
    reward: str = option("", "proxy reward: a reward-model dir, an ensemble dir, module:function, or a weighted sum")
    gold_reward: str = option("", "a trusted reward that only measures: --reward's grammar (optional)")
    prompts: str = option("", "prompts: any data file with a 'prompt' column")
    output: str = option("", "output directory (bon.json, bon.png, config.yaml)")
    n: str = option("1,2,4,8,16,32,64", "the values of k, comma-separated, increasing; max(n) samples per prompt")
    max_new_tokens: int = option(64, "longest completion")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling threshold")
    batch_size: int = option(16, "sequences sampled (and scored by a reward model) per batch")
    max_length: int = option(512, "prompts are cut to their last N tokens")
    max_prompts: int = option(0, "use the first N prompts (0: all)")
    seed: int = option(42, "random seed of the sampling and the bootstrap")
    ensemble_aggregate: Literal["mean", "min", "mean_minus_std", "uwo"] = option(
        "mean", "how an ensemble reward combines members: mean, min, mean − λ·std, or uwo: mean − λ·variance"
    )
    ensemble_lambda: float = option(1.0, "λ of mean_minus_std and uwo")
    overwrite: bool = option(False, "replace an existing non-empty OUTPUT")
    trust_remote_code: bool = option(False, "allow model code from the model's repository to run")

    @property
    def resume(self) -> bool:
        """Read by ``claim_output``: a best-of-n measurement has no checkpoints to resume from."""
        return False

    @property
    def ks(self) -> list[int]:
        return parse_ks(self.n)

    def validate(self) -> None:
        for name in ("model", "reward", "prompts", "output"):
            if not getattr(self, name):
                raise UserError(f"{config_io.flag(name)} is required (or set `{name}:` in the config file)")
        parse_ks(self.n)
        config_io.check_finite_floats(self)
        for name in ("max_new_tokens", "batch_size", "max_length"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        for name in ("max_prompts", "seed", "ensemble_lambda"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        require(self, "temperature", self.temperature > 0, "positive (best-of-n needs samples that differ)")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]")


def parse_ks(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]: integers ≥ 1, strictly increasing; anything else is a UserError naming --n."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(parts):
        raise UserError(f"--n {text!r}: expected comma-separated integers such as 1,2,4,8")
    try:
        ks = [int(part) for part in parts]
    except ValueError:
        raise UserError(f"--n {text!r}: expected comma-separated integers such as 1,2,4,8") from None
    if min(ks) < 1:
        raise UserError(f"--n {text!r}: every k must be at least 1")
    if any(b <= a for a, b in itertools.pairwise(ks)):
        raise UserError(f"--n {text!r}: the values must be increasing, without repeats")
    return ks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_io.add_arguments(parser, BonConfig)


def run(args: argparse.Namespace) -> None:
    config = config_io.resolve(BonConfig, args)
    output = run_bon(config, args.config)
    print(f"wrote {output / 'bon.json'} and {output / 'bon.png'}")


def run_bon(config: BonConfig, config_file: str | None = None) -> Path:
    """Sample, score, estimate, fit, write; returns OUTPUT. Nothing is written before everything is known."""
    from accelerate import Accelerator

    from posttrain.training.output import check_not_an_input, claim_output

    check_not_an_input(config.output, [("--config", config_file)] if config_file else [])
    accelerator = Accelerator(cpu=not _has_accelerator())
    with claim_output(config, accelerator) as out:
        prompts, proxy, gold = sample_and_score(config, accelerator.device)
        result = summarise(config, proxy, gold)
        result["prompts"] = len(prompts)
        out.work.mkdir(parents=True, exist_ok=True)
        config_io.save(config, out.work / "config.yaml")
        (out.work / "bon.json").write_text(json.dumps(result, indent=2))
        plot(result, out.work / "bon.png")
        out.commit(accelerator)
    return out.final


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def load_prompts(config: BonConfig, tokenizer) -> Any:
    """The prompts of ``--prompts`` (the first ``--max-prompts``), tokenized as the RL stages do."""
    from posttrain.data.loading import load_rows
    from posttrain.training.rollout import tokenize_prompts

    try:
        rows = load_rows(config.prompts, "train")
    except UserError as err:
        raise UserError(f"--prompts {err}") from err
    if config.max_prompts:
        rows = rows.select(range(min(config.max_prompts, len(rows))))
    return tokenize_prompts(rows, tokenizer, config.max_length, config.prompts)


def sample_and_score(config: BonConfig, device) -> tuple[list[Any], np.ndarray, np.ndarray | None]:
    """max(n) completions per prompt, sampled once; (prompts, proxy (P, N), gold (P, N) or None)."""
    import torch
    from accelerate.utils import set_seed

    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.rewards import parse_reward
    from posttrain.stages.rl_common import decode
    from posttrain.training.rollout import sample

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    rows = load_prompts(config, tokenizer)
    rewards = {name: parse_reward(getattr(config, name), config.batch_size, device, config.ensemble_aggregate,
                                  config.ensemble_lambda, config_io.flag(name))
               for name in ("reward", "gold_reward") if getattr(config, name)}  # fmt: skip
    model = load_model(config.model, trust_remote_code=config.trust_remote_code).eval().to(device)
    per_prompt = max(config.ks)
    prompts = [p for p in rows["prompt"] for _ in range(per_prompt)]  # prompt-major: row i is prompt i // N
    prompt_ids = [p for p in rows["prompt_ids"] for _ in range(per_prompt)]
    set_seed(config.seed)
    completions = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), config.batch_size):
            rollout = sample(model, prompt_ids[start : start + config.batch_size], tokenizer, config)
            completions += decode(rollout, tokenizer)
    scores = {name: reward(prompts, completions).double().cpu().numpy().reshape(-1, per_prompt)
              for name, reward in rewards.items()}  # fmt: skip
    return list(rows["prompt"]), scores["reward"], scores.get("gold_reward")


def per_prompt_best_of_k(proxy: np.ndarray, values: np.ndarray, ks: list[int]) -> np.ndarray:
    """Best-of-k estimate of ``values`` (selected by ``proxy``) per prompt and k: (P, N), (P, N) -> (P, K)."""
    return np.stack([best_of_ks(p, v, ks) for p, v in zip(proxy, values, strict=True)])


def mean_and_interval(estimates: np.ndarray, seed: int) -> tuple[np.ndarray, list[list[float] | None]]:
    """Mean over prompts of (P, K) estimates, and its 95% percentile-bootstrap interval over prompts
    (``scipy.stats.bootstrap``; None for a single prompt, which has nothing to resample)."""
    from scipy import stats

    means = estimates.mean(axis=0)  # (K,)
    if len(estimates) < 2:
        return means, [None] * len(means)
    interval = stats.bootstrap((estimates,), np.mean, axis=0, vectorized=True, method="percentile",
                               confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                               random_state=np.random.default_rng(seed)).confidence_interval  # fmt: skip
    return means, [[float(lo), float(hi)] for lo, hi in zip(interval.low, interval.high, strict=True)]


def summarise(config: BonConfig, proxy: np.ndarray, gold: np.ndarray | None) -> dict[str, Any]:
    """bon.json's content (all but ``prompts``): per-k rows, fits of the best-of-n form, the config."""
    ks = config.ks
    sqrt_kl = [math.sqrt(kl_bon(k)) for k in ks]
    proxy_mean, proxy_ci = mean_and_interval(per_prompt_best_of_k(proxy, proxy, ks), config.seed)
    gold_mean, gold_ci = [None] * len(ks), [None] * len(ks)
    if gold is not None:
        gold_mean, gold_ci = mean_and_interval(per_prompt_best_of_k(proxy, gold, ks), config.seed)
    rows = [
        {"k": k, "kl_bon": kl_bon(k), "sqrt_kl": d, "proxy": float(p), "proxy_ci": p_ci,
         "gold": None if g is None else float(g), "gold_ci": g_ci}
        for k, d, p, p_ci, g, g_ci in zip(ks, sqrt_kl, proxy_mean, proxy_ci, gold_mean, gold_ci, strict=True)
    ]  # fmt: skip
    fits = {"proxy": None, "gold": None}
    if len(ks) >= 3:
        fits["proxy"] = fit_curve(sqrt_kl, proxy_mean, "bon").as_dict()
        if gold is not None:
            fits["gold"] = fit_curve(sqrt_kl, gold_mean, "bon").as_dict()
    return {"config": dataclasses.asdict(config), "rows": rows, "fits": fits, "samples_per_prompt": max(ks)}


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per reward (proxy, gold): best-of-k reward against √KL_bon, 95% intervals, the fitted form."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    from posttrain.ops.overoptimisation import Fit

    rows = result["rows"]
    names = [name for name in ("proxy", "gold") if rows[0][name] is not None]
    d = np.array([row["sqrt_kl"] for row in rows])
    grid = np.linspace(0, max(d.max(), 0.1) * 1.05, 200)
    fig = Figure(figsize=(5 * len(names), 3.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        colour = {"proxy": "#dd8452", "gold": "#2a7ab0"}[name]
        values = np.array([row[name] for row in rows])
        intervals = np.array([row[f"{name}_ci"] or [row[name]] * 2 for row in rows]).T  # (2, K)
        ax.errorbar(d, values, yerr=np.abs(intervals - values), fmt="o", color=colour, capsize=3, label="best of k")
        fit = result["fits"][name]
        if fit is not None:
            ax.plot(grid, predict(Fit(**fit), grid), color=colour, alpha=0.6,
                    label=f"c + d(α − βd): α={fit['alpha']:.3g}, β={fit['beta']:.3g}")  # fmt: skip
        for row in rows:
            ax.annotate(f"k={row['k']}", (row["sqrt_kl"], row[name]), textcoords="offset points", xytext=(3, -11),
                        fontsize=7, color="#666")  # fmt: skip
        ax.set_xlabel("d = √KL_bon (√nats)")
        ax.set_ylabel(f"{name} reward")
        ax.set_title(f"{name} reward of the best of k samples", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
