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


def attention_mask_for(model, mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """The attention mask to give `model` for the last `q_len` columns of padding mask `mask` [N, kv].

    Every left-padding position is a query that sees no key. CUDA's SDPA kernels then store a
    -inf log-sum-exp for it and their backward recomputes exp(-inf - -inf) = NaN: the row's
    output is never read, yet the NaN reaches every weight's gradient while the loss stays
    finite. Under SDPA a padded batch therefore gets a 4D boolean mask in which a padding query
    sees its causal window (padding included) and a real query only real keys: no row is empty
    and the real rows are exactly as before. Other implementations keep the 2D mask (eager fills
    masked scores with a finite minimum; flash-attention drops the padding), as do unpadded batches.
    """
    config = getattr(getattr(model, "module", model), "config", None)  # unwraps a DeepSpeed engine
    if getattr(config, "_attn_implementation", None) != "sdpa" or bool(mask.all()):
        return mask
    real = mask.bool()
    width = real.shape[1]
    q_pos = torch.arange(width - q_len, width, device=mask.device)
    causal = torch.arange(width, device=mask.device)[None, :] <= q_pos[:, None]  # [q, kv]
    padding_query = ~real[:, width - q_len:, None]  # [N, q, 1]
    return (causal & (real[:, None, :] | padding_query))[:, None]  # [N, 1, q, kv]
