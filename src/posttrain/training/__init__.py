"""The one training loop every stage shares, with its optimizer, checkpoints and metrics."""
