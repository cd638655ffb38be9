"""AdamW over the trainable parameters and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from posttrain.config import TrainConfig

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); biases and norm weights (1-D) get no weight decay.

    The fused kernel (one pass over all parameters; CPU and GPU since PyTorch 2.4, and the default of
    transformers' Trainer with PyTorch >= 2.8): an update of SmolLM2-135M's fp32 parameters takes about
    0.1 s on 2 CPU threads against 0.7 s for the per-parameter loop (bench/optimizer_step.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=True,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Linear warmup over ``warmup_ratio`` of the steps, then linear/cosine decay or constant."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(SCHEDULERS[config.lr_scheduler], optimizer, warmup, total_steps)
