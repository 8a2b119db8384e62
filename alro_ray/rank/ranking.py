"""Ranking with a (fine-tuned) causal LM: the inference modes of spec §4, batched.

Shared by validation during training, the batch evaluation job and the Serve deployment.
Inputs are prompt token ids ending with the response header (see `RankTokenizer.prompt_ids`);
outputs are candidate orders as prompt positions, best first.

  one-pass     rank by the first slot's distribution over the identifier tokens (no decoding)
  generate     greedy decoding where each slot may only pick a candidate not picked yet
  score        the score head's per-candidate scores, in one forward pass (model/score_head.py)
  free         unconstrained greedy generation, parsed and repaired (what the paper did)
  bootstrap@p  p candidate orders ranked by generate, mapped back and averaged (Borda)
"""

from __future__ import annotations

from typing import Sequence

import torch

from alro_ray.errors import NonFiniteError
from alro_ray.model.hidden import hidden_states_at
from alro_ray.model.padding import left_pad, positions
from alro_ray.rank.decoding import borda, constrained_greedy_order, parse_ranking_text, permutations_for_bootstrap
from alro_ray.rank.modes import MODES


def refuse_nonfinite(scores: torch.Tensor, mode: str, rows: torch.Tensor | None = None) -> None:
    """Raise NonFiniteError when the model's scores [B, ...] hold NaN/inf: argsort, argmax and
    constrained picks would silently turn them into an order (NaN everywhere gives the prompt
    order). Check the model's own scores, before any masking of chosen candidates; `rows`
    restricts the check to rows still in use."""
    finite = torch.isfinite(scores).flatten(1).all(dim=1)
    if rows is not None:
        finite = finite | ~rows
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    raise NonFiniteError(
        f"{mode} ranking: the model's scores are NaN or infinite for {len(bad)} of {len(finite)} prompts of "
        f"the batch (rows {bad[:10]}{' ...' if len(bad) > 10 else ''}): its weights or these inputs produce "
        f"non-finite values, so no order from them means anything. Check the checkpoint (a diverged or "
        f"corrupted run) and retrain it")


@torch.no_grad()
def rank_batch(model, prompts: Sequence[Sequence[int]], identifier_ids: Sequence[int], mode: str,
               pad_id: int, scorer=None) -> tuple[list[list[int]], list[list[float]]]:
    """Orders (prompt positions best first) and per-candidate scores for a batch of prompts.

    Scores: one-pass gives the first slot's log-probabilities over the identifiers; generate
    gives minus the slot at which each candidate was picked (higher = better), for callers that
    want one number per candidate; score gives the score head's scores (`scorer`, a
    model/score_head.CandidateScorer, needed by that mode only).
    """
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; choose from {MODES}")
    if mode == "score" and scorer is None:
        raise ValueError("ranking mode 'score' needs a ranker trained with a score head "
                         "(model.head.kind linear or mlp, loss.objective score); this one has none")
    device = next(model.parameters()).device
    c = len(identifier_ids)
    ident = torch.tensor(list(identifier_ids), dtype=torch.long, device=device)
    ids, mask = left_pad(prompts, pad_id, device)
    position_ids = positions(mask)
    if mode == "score":  # the head's layer only: the layers above it need not run
        scores = scorer.scores({scorer.layer: hidden_states_at(model, scorer.layer, ids, mask)}, prompts, c)
        refuse_nonfinite(scores, mode)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        return order.tolist(), scores.tolist()
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=(mode == "generate"),
                logits_to_keep=1)
    first = out.logits[:, -1, :].float()[:, ident]
    refuse_nonfinite(first, mode)
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
            refuse_nonfinite(state["scores"], mode)
        return state["scores"]

    order = constrained_greedy_order(slot_scores, len(prompts), c, device=device)
    scores = torch.empty(len(prompts), c)
    scores.scatter_(1, order.cpu(), -torch.arange(1, c + 1, dtype=torch.float).expand(len(prompts), c))
    return order.tolist(), scores.tolist()


@torch.no_grad()
def free_batch(model, prompts: Sequence[Sequence[int]], c: int, pad_id: int, eos_id: int, tokenizer,
               max_new_tokens: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """Unconstrained greedy generation, then the spec's repair rule: (orders, needed_repair)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    position_ids = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    past, pos = out.past_key_values, position_ids[:, -1:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens or 2 * c + 4):  # " A" is one token: room for C letters and some noise
        refuse_nonfinite(out.logits[:, -1, :], "free", rows=~done)
        nxt = out.logits[:, -1, :].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        generated.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
    tokens = torch.stack(generated, dim=1).tolist()
    orders, repaired = [], []
    for row in tokens:
        row = row[: row.index(eos_id)] if eos_id in row else row
        order, fixed = parse_ranking_text(tokenizer.decode(row), c)
        orders.append(order)
        repaired.append(fixed)
    return orders, repaired


def bootstrap_orders(model, prompt_for, seeds: Sequence[int], c: int, p: int, pad_id: int,
                     identifier_ids: Sequence[int], batch_size: int = 8) -> list[list[int]]:
    """Bootstrapping @p (Hou et al. 2023): each row ranked under p candidate orders by
    `generate`, every copy with its own permutation, positions mapped back and Borda-averaged.

    prompt_for(row_index, perm) -> prompt ids showing the row's candidates as perm[j] = original
    index at position j. seeds[r] seeds row r's permutations (the first copy is the original order).
    """
    jobs = [(r, perm) for r, seed in enumerate(seeds) for perm in permutations_for_bootstrap(c, p, seed)]
    copies: list[list[list[int]]] = [[] for _ in seeds]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        try:
            orders, _ = rank_batch(model, [prompt_for(r, perm) for r, perm in chunk], identifier_ids, "generate", pad_id)
        except NonFiniteError as e:
            raise NonFiniteError(f"bootstrap@{p} (each copy ranked by generate): {e}") from None
        for (r, perm), order in zip(chunk, orders):
            copies[r].append([perm[j] for j in order])  # permuted positions -> original positions
    return [borda(rows, c) for rows in copies]
