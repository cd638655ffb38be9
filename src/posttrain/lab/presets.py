"""Every setting of a lab run, in one table: the world, the models, each stage and the evaluation.

A preset is a ``Preset``; ``PRESETS`` names the three the CLI offers. An experiment changes a few
fields per arm with ``dataclasses.replace`` (``lab/experiments.py``), so whatever a run does, its
``lab.json`` holds every value it ran with. Logging frequencies are not settings: they change no
result.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    # the world (lab/world.py)
    n_towns: int = 40
    unknowable_share: float = 0.15  # of the facts about towns in the corpus
    unseen_share: float = 0.25  # of the towns, in no document at all
    n_arithmetic: int = 30  # sums among the questions of training and the held-out split
    held_out_share: float = 0.2  # of each kind of question, never asked in training
    corpus_copies: int = 6  # documents stating each known fact
    arithmetic_copies: int = 1  # times each sum is drilled in the corpus
    demonstrated_share: float = 1.0  # of the training questions, those with SFT demonstrations
    unsure_share: float = 0.8  # of known facts, also given to a writer who abstained (world.demonstrations)
    # the evaluation: the held-out questions in each of their phrasings, and towns no text names
    eval_towns: int = 37  # three unknowable questions each
    max_new_tokens: int = 24  # every sampled answer: preferences, PPO rollouts, evaluation
    kl_samples: int = 2  # answers per evaluation question for the KL to SFT
    eval_batch_size: int = 256  # questions answered at once (the KL samples depend on the batches)
    eval_choice_calibration: bool = False  # also read confidence as a multiple choice (the calibration experiment)
    # the model
    vocab_size: int = 1000
    hidden_size: int = 128
    intermediate_size: int = 344  # Llama's 8/3 of the hidden size, rounded to a multiple of 8
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    # base: language modelling on the corpus
    pretrain_steps: int = 410  # 66 passes over the quick corpus
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 3e-3
    pretrain_max_length: int = 128
    # sft
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_learning_rate: float = 1e-3
    # preferences
    samples_per_prompt: int = 16
    sample_temperature: float = 1.0
    pairs_per_prompt: int = 20
    pool_size: int = 8  # annotators
    overlap: float = 0.25  # share of pairs labelled by three annotators
    label_budget: float = 0.0  # what the training labels may cost, in hurried labels (0: every pair is labelled)
    # rm
    rm_steps: int = 100
    rm_batch_size: int = 8  # prompts per batch, each with all its labelled pairs
    rm_learning_rate: float = 3e-4
    rm_ensemble: int = 1  # reward models (seeds seed + i); PPO aggregates them by ppo_ensemble_aggregate
    # ppo
    ppo_steps: int = 72
    ppo_rollout_prompts: int = 32
    ppo_batch_size: int = 16
    ppo_epochs: int = 2
    ppo_temperature: float = 0.7
    ppo_learning_rate: float = 2.5e-5
    ppo_kl_coef: float = 0.05
    ppo_ensemble_aggregate: str = "mean"  # mean, min, mean_minus_std or uwo (rm_ensemble > 1)
    ppo_stop_on_overoptimisation: bool = False  # stop when the gold monitor sees the onset
    # dpo
    dpo_steps: int = 60
    dpo_batch_size: int = 16
    dpo_learning_rate: float = 1e-4
    dpo_beta: float = 0.1


PRESETS = {
    "quick": Preset(),
    # seconds, not minutes: checks that every step runs and chains, shows nothing (tests use it)
    "smoke": Preset(
        n_towns=8,
        eval_towns=2,
        hidden_size=32,
        intermediate_size=128,
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
        ppo_batch_size=8,
    ),
    "full": Preset(
        n_towns=80,
        arithmetic_copies=3,
        eval_towns=40,
        hidden_size=192,
        intermediate_size=768,
        pretrain_steps=1500,
        sft_steps=300,
        pairs_per_prompt=28,
        rm_steps=250,
        ppo_steps=200,
        ppo_learning_rate=5e-5,  # at 2.5e-5 this bigger model hardly exploited its reward model in 200 iterations
    ),
}
