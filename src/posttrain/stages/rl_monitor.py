"""Watching an RL run for reward hacking, on any model: the gold reward, held-out prompts, the
over-optimisation detector, and the known signatures of hacking (the only warning without a gold reward).

Per iteration, for every run:
  objective/sqrt_kl              √ of the mean per-completion KL to the reference (Gao et al. 2022's x axis)
  objective/entropy_per_token    mean −log π of the sampled tokens: a Monte Carlo estimate of the entropy
  objective/length_score_corr    Pearson correlation of the proxy score with completion length
  completions/duplicate_fraction share of a prompt's completions that repeat another one of its group (k > 1)
With ``--gold-reward`` (on the iterations ``--gold-every`` picks):
  objective/gold, objective/gold_std, objective/gold_count   the gold score's mean, spread and sample count
  objective/proxy_gold_spearman  rank correlation of proxy and gold over the rollout
and the gold score of each sample in samples.jsonl. With ``--eval-prompts``, before the first
iteration, every ``--eval-steps`` and at the last: ``eval/objective/{scores,gold,kl,sqrt_kl}``
on prompts the policy never trains on.

The detector (``posttrain.ops.overoptimisation.OnsetDetector``) follows the gold curve; the
policy whose window holds the best smoothed gold is kept in ``OUTPUT/best-gold/``. At the end
``OUTPUT/overoptimisation.json`` holds the fit of Gao et al.'s RL form to gold against √KL,
the onset (if any), the best-gold iteration and the warnings.

Nothing here changes the update: the gold reward and the held-out sampling run inside
``isolated_rng`` (torch's, NumPy's and Python's generators are restored afterwards), and the
gold score never reaches the loss, so a run with ``--gold-reward`` trains bit for bit as one
without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from scipy import stats

from posttrain.errors import UserError
from posttrain.models.loading import is_peft
from posttrain.ops import overoptimisation as overopt
from posttrain.stages.rl_common import RLConfig, RLSetup, decode, reference_log_probs, score
from posttrain.training.rl_loop import Experience
from posttrain.training.rollout import batched_log_probs
from posttrain.training.sampler import SAMPLERS

log = logging.getLogger(__name__)
BEST_GOLD = "best-gold"
SUMMARY = "overoptimisation.json"


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving torch's, NumPy's or Python's random state (the update must not see it)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def rollout_signals(scores: np.ndarray, lengths: np.ndarray, token_nll: float, completions: list[str],
                    group: int) -> dict[str, float]:  # fmt: skip
    """The signatures of hacking that need no gold reward, over one rollout: scores and lengths (N,), the
    mean −log π of its sampled tokens, and the completions (groups of ``group`` consecutive ones)."""
    signals = {"objective/entropy_per_token": token_nll}
    if np.ptp(lengths) > 0 and np.ptp(scores) > 0:
        signals["objective/length_score_corr"] = float(np.corrcoef(scores, lengths)[0, 1])
    if group > 1:
        groups = [completions[i : i + group] for i in range(0, len(completions), group)]
        signals["completions/duplicate_fraction"] = float(np.mean([1 - len(set(g)) / len(g) for g in groups]))
    return signals


def gold_signals(scores: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Mean, spread and count of the rollout's gold scores, and their rank correlation with the proxy's."""
    signals = {
        "objective/gold": float(gold.mean()),
        "objective/gold_std": float(gold.std(ddof=1)) if len(gold) > 1 else 0.0,
        "objective/gold_count": float(len(gold)),
    }
    if np.ptp(scores) > 0 and np.ptp(gold) > 0:
        signals["objective/proxy_gold_spearman"] = float(stats.spearmanr(scores, gold).statistic)
    return signals


class SignatureWatch:
    """Warn once per signature of hacking, with its numbers (with a gold reward too: they say why), when
    - the KL to the reference passes ``--kl-budget`` (nats per completion);
    - the correlation of the score with length has risen by 0.3 over its first window, to at least 0.5;
    - the per-token entropy has fallen below a quarter of its first window's;
    - the share of duplicate completions within a group has risen by 0.3 over its first window, to at least 0.5.
    Windows are ``window`` iterations long (trailing means), so one noisy rollout does not warn."""

    RISES: ClassVar[dict[str, str]] = {
        "objective/length_score_corr": "the correlation of the score with completion length",
        "completions/duplicate_fraction": "the share of identical completions within a prompt's group",
    }

    def __init__(self, window: int, kl_budget: float, gold: bool) -> None:
        self.window, self.kl_budget = window, kl_budget
        self.advice = "" if gold else "; score with --gold-reward to know"
        self.recent: dict[str, deque] = {}
        self.first: dict[str, float] = {}
        self.fired: set[str] = set()

    def update(self, step: int, record: dict[str, float]) -> list[dict[str, Any]]:
        warnings = []
        kl = record["objective/kl"]
        if self.kl_budget and kl > self.kl_budget:
            warnings += self._fire("kl_budget", step, f"the KL to the reference, {kl:.3g} nats per completion, "
                                   f"passed --kl-budget {self.kl_budget:g}")  # fmt: skip
        for key in (*self.RISES, "objective/entropy_per_token"):
            now = self._window_mean(key, record.get(key))
            if now is None:
                continue
            first = self.first.setdefault(key, now)
            if key in self.RISES and now >= max(first + 0.3, 0.5):
                warnings += self._fire(key, step, f"{self.RISES[key]} rose from {first:.2f} to {now:.2f}")
            if key == "objective/entropy_per_token" and now < first / 4:
                warnings += self._fire(key, step, f"the entropy per token collapsed from {first:.3g} to {now:.3g} "
                                       "nats (the policy has almost stopped exploring)")  # fmt: skip
        return warnings

    def _window_mean(self, key: str, value: float | None) -> float | None:
        if value is None:
            return None
        recent = self.recent.setdefault(key, deque(maxlen=self.window))
        recent.append(value)
        return sum(recent) / len(recent) if len(recent) == self.window else None

    def _fire(self, kind: str, step: int, message: str) -> list[dict[str, Any]]:
        if kind in self.fired:
            return []
        self.fired.add(kind)
        log.warning("iteration %d: %s: a sign of reward hacking%s", step, message, self.advice)
        return [{"kind": kind, "step": step, "message": message}]

    def state_dict(self) -> dict[str, Any]:
        recent = {k: list(v) for k, v in self.recent.items()}
        return {"recent": recent, "first": self.first, "fired": sorted(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = {k: deque(v, maxlen=self.window) for k, v in state["recent"].items()}
        self.first, self.fired = dict(state["first"]), set(state["fired"])


class RLMonitor:
    """The per-iteration watch described in the module docstring: ``run_rl`` calls ``observe`` on each
    rollout before the update and ``evaluate`` on held-out prompts; its state is saved with every checkpoint."""

    def __init__(self, config: RLConfig, setup: RLSetup, output: Path, policy_of: Callable) -> None:
        self.config, self.setup, self.output, self.policy_of = config, setup, output, policy_of
        self.detector = overopt.OnsetDetector(config.onset_window, config.onset_z) if setup.gold else None
        self.watch = SignatureWatch(config.onset_window, config.kl_budget, gold=setup.gold is not None)
        self.trace: list[dict[str, float]] = []  # per gold-scored iteration: step, sqrt_kl, gold, gold_sem, proxy
        self.warnings: list[dict[str, Any]] = []
        self.stop = False

    @property
    def accelerator(self) -> Accelerator:
        return self.setup.accelerator

    def gold_due(self, step: int, last: bool) -> bool:
        return self.setup.gold is not None and (step == 1 or last or step % self.config.gold_every == 0)

    def observe(self, step: int, experience: Experience, model, last: bool) -> dict[str, float]:
        """The iteration's extra metrics over all processes' samples (the same on every process); the gold
        scores go into ``experience.samples``."""
        tensors, gather = experience.tensors, self.accelerator.gather
        mask = tensors["response_mask"]
        nll = self._sum(-(tensors["old_logprobs"] * mask).sum().item()) / self._sum(mask.sum().item())
        scores = gather(experience.scores).double().cpu().numpy()
        lengths = gather(tensors["n_targets"]).double().cpu().numpy()
        record = rollout_signals(scores, lengths, nll, gather_object(experience.completions),
                                 self.config.num_generations)  # fmt: skip
        kl = self._sum(experience.metrics["objective/kl"]) / self.accelerator.num_processes
        record["objective/sqrt_kl"] = math.sqrt(max(kl, 0.0))
        if self.gold_due(step, last):
            with isolated_rng():
                gold = self.setup.gold(experience.prompts, experience.completions).double()
            for sample, value in zip(experience.samples, gold.tolist(), strict=False):
                sample["gold"] = value
            record |= gold_signals(scores, gather(gold.to(self.accelerator.device)).cpu().numpy())
            self._follow_gold(step, record, float(scores.mean()), model)
        self.warnings += self.watch.update(step, record | {"objective/kl": kl})
        return record

    def _sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        total = torch.tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(total, "sum").item()

    def _follow_gold(self, step: int, record: dict[str, float], proxy: float, model) -> None:
        """Feed the detector; keep the best-gold policy; log the onset once (and stop, if asked)."""
        sem = overopt.sem(record["objective/gold_std"], record["objective/gold_count"])
        point = {"step": step, "sqrt_kl": record["objective/sqrt_kl"], "gold": record["objective/gold"],
                 "gold_sem": sem, "proxy": proxy}  # fmt: skip
        self.trace.append(point)
        onset = self.detector.update(step, point["gold"], sem, proxy)
        if self.detector.improved:
            self.save_best(model)
        if onset is not None:
            noise = f"{onset.drop / onset.noise:.1f} standard errors" if onset.noise > 0 else "with no sampling noise"
            log.warning(
                "iteration %d: over-optimisation: the smoothed gold reward fell from %.4g (iteration %d) to %.4g "
                "(%s) while the proxy rose from %.4g to %.4g",
                *(step, onset.best_gold, onset.peak_step, onset.gold, noise, onset.proxy_at_peak, onset.proxy),
            )
            self.stop = self.config.stop_on_overoptimisation

    def save_best(self, model) -> None:
        """The policy (LoRA merged into a copy) as a Hugging Face checkpoint in OUTPUT/best-gold, replaced whole."""
        if self.accelerator.is_main_process:
            policy = self.policy_of(model)
            policy = copy.deepcopy(policy).merge_and_unload() if is_peft(policy) else policy
            staging = self.output / f".{BEST_GOLD}.new"
            if staging.exists():  # left by a run killed while saving
                shutil.rmtree(staging)
            policy.save_pretrained(staging)
            self.setup.tokenizer.save_pretrained(staging)
            if (self.output / BEST_GOLD).exists():
                shutil.rmtree(self.output / BEST_GOLD)
            staging.rename(self.output / BEST_GOLD)
        self.accelerator.wait_for_everyone()

    def eval_due(self, step: int, last: bool) -> bool:
        every = self.config.eval_steps
        return self.setup.eval_prompts is not None and (step == 0 or last or (every and step % every == 0))

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """One completion per held-out prompt (this process's share), scored by proxy and gold; KL to the reference."""
        s, config = self.setup, self.config
        rows = s.eval_prompts[self.accelerator.process_index :: self.accelerator.num_processes]
        policy, chunk = self.policy_of(model), config.rollout_prompts * config.num_generations
        sums = torch.zeros(4, dtype=torch.float64)
        with isolated_rng():
            for start in range(0, len(rows["prompt"]), chunk):
                prompts = rows["prompt"][start : start + chunk]
                samples = SAMPLERS[config.sampler](policy, rows["prompt_ids"][start : start + chunk], s.tokenizer,
                                                   config)  # fmt: skip
                rollout = samples.rollout
                completions = decode(rollout, s.tokenizer)
                proxy = score(s.reward, prompts, completions, rollout, config)
                gold = s.gold(prompts, completions) if s.gold else torch.zeros(len(prompts))
                logps = samples.log_probs
                if logps is None:  # the sampler gave none (generate): a forward computes them
                    logps = batched_log_probs(policy, rollout, config.temperature, config.batch_size)
                kl = ((logps - reference_log_probs(s.reference, rollout, config)) * rollout.response_mask).sum(-1)
                sums += torch.tensor([proxy.sum().item(), gold.sum().item(), kl.sum().item(), len(prompts)])
        proxy, gold, kl, n = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").tolist()
        record = {"eval/objective/scores": proxy / n, "eval/objective/kl": kl / n,
                  "eval/objective/sqrt_kl": math.sqrt(max(kl / n, 0.0))}  # fmt: skip
        return record | ({"eval/objective/gold": gold / n} if s.gold else {})

    def finish(self) -> None:
        """OUTPUT/overoptimisation.json: the fit of gold against √KL, the onset, the best-gold iteration, warnings."""
        if not self.accelerator.is_main_process:
            return
        summary = {"fit": None, "onset": None, "best_gold": None, "warnings": self.warnings}
        if self.detector is not None:
            summary["fit"] = fit_trace(self.trace)
            summary["onset"] = self.detector.onset.as_dict() if self.detector.onset else None
            if self.detector.best_step is not None:
                summary["best_gold"] = {"step": self.detector.best_step, "smoothed_gold": self.detector.best_smoothed,
                                        "directory": BEST_GOLD}  # fmt: skip
        (self.output / SUMMARY).write_text(json.dumps(summary, indent=2))

    def state_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "warnings": self.warnings, "watch": self.watch.state_dict(),
                "detector": self.detector.state_dict() if self.detector else None}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trace, self.warnings = list(state["trace"]), list(state["warnings"])
        self.watch.load_state_dict(state["watch"])
        if self.detector is not None:
            saved = state["detector"]["settings"] if state["detector"] else "no gold reward"
            if saved != {"window": self.detector.window, "z": self.detector.z, "patience": self.detector.patience}:
                raise UserError(f"--resume: the checkpoint's detector had {saved}; resume with the same "
                                "--gold-reward, --onset-window and --onset-z")  # fmt: skip
            self.detector.load_state_dict(state["detector"])


def fit_trace(trace: list[dict[str, float]]) -> dict[str, Any] | None:
    """Gao et al.'s RL form fitted to gold against √KL, or None while the trace cannot define it."""
    if len({p["sqrt_kl"] for p in trace}) < 3:
        return None
    return overopt.fit_curve([p["sqrt_kl"] for p in trace], [p["gold"] for p in trace], "rl").as_dict()
