"""The names of the ranking modes, kept free of torch: the Serve ingress validates requests
with them and never loads a model (ranking.py documents the modes)."""

from __future__ import annotations

from alro_ray.config import RANK_MODES

MODES = RANK_MODES  # the modes rank_batch runs on ready prompts (train.eval_mode takes them too)


def parse_mode(mode: str) -> tuple[str, int]:
    """("bootstrap", p) for "bootstrap@p", else (mode, 1); a clear error for unknown modes."""
    if mode.startswith("bootstrap@"):
        p = mode.split("@", 1)[1]
        if not p.isdigit() or int(p) < 1:
            raise ValueError(f"bad mode {mode!r}: bootstrap@p needs an integer p >= 1")
        return "bootstrap", int(p)
    if mode not in (*MODES, "free"):
        raise ValueError(f"unknown ranking mode {mode!r}; choose from {', '.join(MODES)}, free, bootstrap@p")
    return mode, 1
