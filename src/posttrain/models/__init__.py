"""Models and tokenizers: loading from disk or hub, LoRA, tiny models built from scratch, GGUF import."""
