"""The model: base-model and tokenizer loading (offline aliases, cache), LoRA, the ranker checkpoint."""
