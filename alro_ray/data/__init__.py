"""Stage 1, data: read interaction logs, build per-user samples, render prompts, tokenize (Ray Data)."""
