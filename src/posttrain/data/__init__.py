"""Datasets: loading, format detection and validation, tokenization with loss masks, batching."""
