"""The lab: a seeded synthetic world with a known ground truth, for running and measuring post-training."""
