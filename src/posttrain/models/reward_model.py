"""Reward models: a causal LM's backbone with a scalar ``score`` head, scored at the last real token.

A reward model is a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1``,
created from any causal-LM checkpoint (the backbone's weights load, a new linear ``score``
head is initialised). Its reward for a prompt + response sequence is

    r(x, y) = w · h_L(x, y)[t*],    t* = the last position whose attention mask is 1

(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al.
2022, InstructGPT). Hugging Face's own pooling finds t* by comparing token ids with
``pad_token_id``, which is wrong when the pad token is EOS and every sequence ends in EOS;
``reward_scores`` uses the attention mask instead.

A trained reward model directory (``posttrain rm``) also holds ``reward_stats.json``: the
mean and standard deviation of its rewards over the training responses, for RL to normalise
with. An ensemble directory holds ``ensemble.json`` and one reward model per member;
``aggregate`` combines the members' scores (Coste et al. 2023).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import UserError
from posttrain.models.loading import (
    MODEL_FILES,
    TOKENIZER_FILES,
    check_model_dir,
    check_source,
    hub_error,
    is_peft,
    load_tokenizer,
)

STATS_FILE = "reward_stats.json"
ENSEMBLE_FILE = "ensemble.json"
Aggregation = Literal["mean", "min", "mean_minus_std", "uwo"]


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar rewards (B,) of sequences (B, T): the ``score`` head on the backbone's last hidden
    state at the last position whose attention mask is 1.

    Right padding is the usual case (t* = mask.sum(-1) − 1). Left or mixed padding (a padded
    prompt followed by a padded completion) also scores right: t* is the last 1 of the mask,
    and position ids are then counted over real tokens only, as generation counts them. Works
    on a plain model or a ``peft`` one.
    """
    model = model.get_base_model() if is_peft(model) else model  # peft: the wrapped model
    head = getattr(model, "score", None)
    if head is None:
        raise UserError(f"{type(model).__name__} has no `score` head: not a reward model (see load_reward_model)")
    width = attention_mask.shape[-1]
    last = width - 1 - attention_mask.flip(-1).argmax(-1)  # (B,) index of the last real token
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    later_real = attention_mask.flip(-1).cummax(-1).values.flip(-1)  # (B, T) 1 where a real token is at or after
    if bool((later_real > attention_mask).any()):  # a pad before a real token: not right padding
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, H)
    pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (B, H)
    return head(pooled).squeeze(-1)  # (B,)


class RewardScorer(torch.nn.Module):
    """A reward model whose ``forward`` is ``reward_scores``.

    Training calls the model through this wrapper, so DDP's gradient synchronisation and
    accelerate's autocast, which both hook ``forward``, see the whole computation.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_scores(self.model, input_ids, attention_mask)


def load_reward_backbone(
    source: str,
    pad_token_id: int,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    flag: str = "--model",
) -> PreTrainedModel:
    """A sequence-classification model with one label from a causal LM (new ``score`` head) or a reward model.

    ``flag`` names the option the source came from, for error messages.
    """
    check_model_dir(source, flag, trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        raise hub_error(source, err, flag) from err
    except ValueError as err:  # an architecture with no sequence-classification class
        raise UserError(f"{flag} {source}: cannot be a reward model: {str(err).splitlines()[0]}") from err
    model.config.pad_token_id = pad_token_id
    return model


@dataclass(frozen=True)
class RewardStats:
    """Mean and standard deviation (ddof 0) of the rewards of ``count`` training responses."""

    mean: float
    std: float
    count: int

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r − mean) / std: rewards on the scale RL expects (zero mean, unit spread on the RM's data)."""
        return (rewards - self.mean) / max(self.std, 1e-8)


class LoadedRewardModel(NamedTuple):
    model: PreTrainedModel  # eval mode
    tokenizer: PreTrainedTokenizerBase
    stats: RewardStats  # mean 0, std 1, count 0 when the directory has no reward_stats.json


def read_stats(directory: str | Path) -> RewardStats:
    """The directory's ``reward_stats.json``; without one (a reward model not trained here), mean 0 and std 1."""
    path = Path(directory) / STATS_FILE
    if not path.is_file():
        return RewardStats(0.0, 1.0, 0)
    values = json.loads(path.read_text())
    return RewardStats(float(values["mean"]), float(values["std"]), int(values["count"]))


def load_reward_model(
    directory: str | Path, trust_remote_code: bool = False, flag: str = "--reward-model"
) -> LoadedRewardModel:
    """``(model in eval mode, tokenizer, stats)`` from a reward-model directory, in one call.

    ``flag`` names the option the directory came from, for error messages.
    """
    source = str(directory)
    check_source(source, "model", MODEL_FILES, flag)
    check_source(source, "tokenizer", TOKENIZER_FILES, flag)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, flag=flag)
    model = load_reward_backbone(source, tokenizer.pad_token_id, trust_remote_code, flag=flag)
    architectures = model.config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{flag} {source}: not a reward model (architectures {architectures}); see posttrain rm")
    return LoadedRewardModel(model.eval(), tokenizer, read_stats(source))


def ensemble_members(directory: str | Path, flag: str = "--reward-model") -> list[Path]:
    """The member directories of an ensemble (``ensemble.json``: ``{"members": ["member-0", ...]}``), in order."""
    path = Path(directory) / ENSEMBLE_FILE
    if not path.is_file():
        raise UserError(f"{flag} {directory}: no {ENSEMBLE_FILE}; not a reward-model ensemble (see rm --ensemble)")
    return [Path(directory) / name for name in json.loads(path.read_text())["members"]]


def load_reward_ensemble(
    directory: str | Path, trust_remote_code: bool = False, flag: str = "--reward-model"
) -> list[LoadedRewardModel]:
    """Every member of an ensemble directory, each as ``load_reward_model`` returns it, in order."""
    return [load_reward_model(member, trust_remote_code, flag) for member in ensemble_members(directory, flag)]


def aggregate(scores: torch.Tensor, how: Aggregation = "mean", lam: float = 1.0) -> torch.Tensor:
    """Combine K members' rewards (K, N) into one reward per sequence (N,).

    With μ = mean over members and σ² = (1/K) Σ_k (r_k − μ)² (population variance):
      mean            μ                      plain ensemble average
      min             min_k r_k              worst-case optimisation (WCO)
      mean_minus_std  μ − λ·σ                uncertainty penalty in reward units
      uwo             μ − λ·σ²               uncertainty-weighted optimisation (UWO)
    Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization", sec. 3 (WCO, UWO).
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise UserError(f"aggregate: expected scores of shape (members, sequences), got {tuple(scores.shape)}")
    mean = scores.mean(0)
    if how == "mean":
        return mean
    if how == "min":
        return scores.min(0).values
    variance = scores.var(0, unbiased=False)
    if how == "mean_minus_std":
        return mean - lam * variance.sqrt()
    if how == "uwo":
        return mean - lam * variance
    raise UserError(f"aggregate: unknown aggregation {how!r}; choose one of mean, min, mean_minus_std, uwo")
