"""Pure ranking helpers for inference (spec §4): constrained greedy decoding, parsing and
repair of free generations, and bootstrapping (random candidate orders + Borda).

Candidates are 0-based indices in prompt order; candidate i carries identifier LETTERS[i].
An "order" lists candidate indices best first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from alro_ray.data.prompts import LETTERS


def identifier_letters(c: int) -> list[str]:
    """Identifiers of c candidates: "A", "B", ... (one letter each, so at most 26)."""
    if not 1 <= c <= len(LETTERS):
        raise ValueError(f"number of candidates must be in 1..{len(LETTERS)}, got {c}")
    return list(LETTERS[:c])


def constrained_pick(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the best-scoring candidate not chosen yet; ties -> lowest index.

    scores [B, C] (any float dtype/device), chosen [B, C] bool. Returns [B] long.
    NaN scores count as the lowest possible score. Never returns a chosen index, even when
    every available score is -inf; a row with nothing left raises ValueError.
    """
    if scores.dim() != 2 or scores.shape != chosen.shape:
        raise ValueError(
            f"scores and chosen must both be [B, C], got {tuple(scores.shape)} and "
            f"{tuple(chosen.shape)}"
        )
    if chosen.dtype != torch.bool:
        raise ValueError(f"chosen must be a bool tensor, got {chosen.dtype}")
    chosen = chosen.to(scores.device)
    available = ~chosen
    if not bool(available.any(dim=1).all()):
        raise ValueError("a row has every candidate chosen already")
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = torch.where(available & ~torch.isnan(scores), scores, neg_inf)
    best = masked.max(dim=1, keepdim=True).values
    # Compare against the row max restricted to available entries (rather than a plain
    # argmax of masked scores) so an all -inf row cannot fall back to a chosen index.
    is_best = available & (masked == best)
    return is_best.to(torch.int32).argmax(dim=1).long()  # argmax returns the first max


def constrained_greedy_order(
    slot_scores_fn: Callable[[int, torch.Tensor], torch.Tensor],
    batch: int,
    c: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Greedy decoding where each slot may only pick a candidate not picked yet.

    For slot k = 0..c-1, slot_scores_fn(k, picks) gets the picks so far ([batch, k] long
    on `device`) and returns [batch, c] scores over the candidates' identifier tokens.
    Returns [batch, c] long: candidate indices best first, always a permutation per row.
    """
    if batch < 1 or c < 1:
        raise ValueError(f"batch and c must be positive, got batch={batch}, c={c}")
    picks = torch.empty(batch, 0, dtype=torch.long, device=device)
    chosen = torch.zeros(batch, c, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    for k in range(c):
        scores = slot_scores_fn(k, picks)
        if tuple(scores.shape) != (batch, c):
            raise ValueError(
                f"slot_scores_fn returned shape {tuple(scores.shape)} at slot {k}, "
                f"expected {(batch, c)}"
            )
        pick = constrained_pick(scores, chosen).to(device)
        chosen[rows, pick] = True
        picks = torch.cat([picks, pick[:, None]], dim=1)
    return picks


def repair(tokens: Sequence[str], c: int) -> tuple[list[int], bool]:
    """Turn generated identifiers into a full order (spec §4, free generation + parse).

    Keeps the first occurrence of each of the first c letters; unknown and repeated
    tokens are dropped; candidates never mentioned are appended in prompt order.
    Returns (order, needed_repair), needed_repair being True when anything was dropped
    or appended. Tokens are matched case-sensitively after stripping whitespace.
    """
    index = {letter: i for i, letter in enumerate(identifier_letters(c))}
    order: list[int] = []
    seen: set[int] = set()
    dropped = False
    for token in tokens:
        i = index.get(token.strip())
        if i is None or i in seen:
            dropped = True
            continue
        seen.add(i)
        order.append(i)
    missing = [i for i in range(c) if i not in seen]
    return order + missing, dropped or bool(missing)


_RESULT_MARKER = re.compile(r"the ranking result is:?", re.IGNORECASE)
# A capital letter standing alone: "B", "(B)", "B,", "B>A". Words ("Bob"), letters glued
# to digits ("B1") and lowercase letters (the article "a") are not identifiers.
_LETTER_TOKEN = re.compile(r"\b([A-Z])\b")


def parse_ranking_text(text: str, c: int) -> tuple[list[int], bool]:
    """Parse a free generation into a full order, then repair it (see `repair`).

    Reads only what follows the last "the ranking result is:" if present (so the prompt
    may be included), else the whole text.
    """
    markers = list(_RESULT_MARKER.finditer(text))
    if markers:
        text = text[markers[-1].end() :]
    return repair(_LETTER_TOKEN.findall(text), c)


def _check_permutation(perm: Sequence[int], c: int | None = None) -> list[int]:
    values = [int(v) for v in perm]
    n = len(values) if c is None else c
    if len(values) != n or sorted(values) != list(range(n)):
        raise ValueError(f"not a permutation of 0..{n - 1}: {list(perm)}")
    return values


def borda(orders: Sequence[Sequence[int]], c: int) -> list[int]:
    """Aggregate full orders (best first) by mean position; ties -> lower candidate index."""
    if len(orders) == 0:
        raise ValueError("borda needs at least one order")
    # Sum of positions ranks the same as the mean (same count for every candidate) and
    # stays exact in integers, so ties are detected reliably.
    totals = [0] * c
    for order in orders:
        for position, candidate in enumerate(_check_permutation(order, c)):
            totals[candidate] += position
    return sorted(range(c), key=lambda i: (totals[i], i))


def permutations_for_bootstrap(c: int, p: int, seed: int) -> list[list[int]]:
    """p candidate orders for bootstrapping @p: the identity first, then seeded random ones.

    Each random order is drawn separately from one seeded generator (LLMRank reused a
    single permutation for every copy). Orders are kept distinct from each other and
    from the identity whenever c! allows p distinct ones, since a duplicate copy only
    repeats work; otherwise repeats are allowed.
    """
    if c < 1 or p < 1:
        raise ValueError(f"c and p must be positive, got c={c}, p={p}")
    rng = np.random.default_rng(seed)
    distinct = math.factorial(c) >= p
    orders = [list(range(c))]
    seen = {tuple(orders[0])}
    while len(orders) < p:
        perm = tuple(int(v) for v in rng.permutation(c))
        if distinct and perm in seen:
            continue
        seen.add(perm)
        orders.append(list(perm))
    return orders


def invert(perm: Sequence[int]) -> list[int]:
    """Inverse permutation: invert(perm)[perm[i]] == i."""
    values = _check_permutation(perm)
    inverse = [0] * len(values)
    for i, v in enumerate(values):
        inverse[v] = i
    return inverse
