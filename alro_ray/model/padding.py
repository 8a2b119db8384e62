"""Left padding for causal-LM batches: every row ends at the last column, so the response (or
the next token to predict) sits at the same offset from the end in every row."""

from __future__ import annotations

from typing import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [len(seqs), longest]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip the padding, counted from `start` (e.g. a cached prefix's length)."""
    return (mask.cumsum(-1) - 1).clamp(min=0) + start
