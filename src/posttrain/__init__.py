"""posttrain: post-training for language models (SFT, reward models, PPO, DPO) and what goes wrong on the way."""

__version__ = "0.1.0"
