"""Ranking with a (fine-tuned) causal LM: the inference modes of spec §4, batched.

Shared by validation during training, the batch evaluation job and the Serve deployment.
Inputs are prompt token ids ending with the response header (see `RankTokenizer.prompt_ids`);
outputs are candidate orders as prompt positions, best first.

  one-pass   rank by the first slot's distribution over the identifier tokens (no decoding)
  generate   greedy decoding where each slot may only pick a candidate not picked yet
"""

from __future__ import annotations

from typing import Sequence

import torch

from alro_ray.decoding import constrained_greedy_order

MODES = ("one-pass", "generate")


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def rank_batch(model, prompts: Sequence[Sequence[int]], identifier_ids: Sequence[int], mode: str,
               pad_id: int) -> tuple[list[list[int]], list[list[float]]]:
    """Orders (prompt positions best first) and per-candidate scores for a batch of prompts.

    Scores: one-pass gives the first slot's log-probabilities over the identifiers; generate
    gives minus the slot at which each candidate was picked (higher = better), for callers that
    want one number per candidate.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; choose from {MODES}")
    device = next(model.parameters()).device
    c = len(identifier_ids)
    ident = torch.tensor(list(identifier_ids), dtype=torch.long, device=device)
    ids, mask = _left_pad(prompts, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                use_cache=(mode == "generate"), logits_to_keep=1)
    first = out.logits[:, -1, :].float()[:, ident]
    if mode == "one-pass":
        scores = torch.log_softmax(first, dim=-1)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        return order.tolist(), scores.tolist()

    state = {"past": out.past_key_values, "mask": mask, "pos": position_ids[:, -1:], "scores": first}

    def slot_scores(k: int, picks: torch.Tensor) -> torch.Tensor:
        if k > 0:  # feed the identifier picked for the previous slot
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["pos"] = state["pos"] + 1
            step = model(input_ids=ident[picks[:, -1:]], attention_mask=state["mask"],
                         position_ids=state["pos"], past_key_values=state["past"], use_cache=True)
            state["past"] = step.past_key_values
            state["scores"] = step.logits[:, -1, :].float()[:, ident]
        return state["scores"]

    order = constrained_greedy_order(slot_scores, len(prompts), c, device=device)
    scores = torch.empty(len(prompts), c)
    scores.scatter_(1, order.cpu(), -torch.arange(1, c + 1, dtype=torch.float).expand(len(prompts), c))
    return order.tolist(), scores.tolist()
