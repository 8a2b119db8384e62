"""ALRO training losses (ALRO_SPEC.md §3) as pure functions on tensors.

Shapes: B lists, C candidates, K = C output slots (slot k = 1..K is the k-th
identifier of the response). Items are indexed in ORIGINAL prompt order i = 0..C-1.
Nothing here knows about models or tokenizers; callers pass logits and indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alro_ray.config import SCORE_LOSSES  # loss.score_loss's names, kept with the config

__all__ = [
    "LossTerms",
    "alro_loss",
    "SCORE_LOSSES",
    "lambda_loss",
    "listnet_loss",
    "literal_permutation_loss",
    "map_scores_to_items",
    "map_to_items",
    "mse_loss",
    "plackett_luce_loss",
    "permutation_loss",
    "predicted_ranks",
    "rank_loss_from_slots",
    "score_consistency_loss",
    "score_rank_loss",
    "sft_loss",
    "slot_probabilities",
    "soft_positions",
]

_LN2 = math.log(2.0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast so softmax/log are taken in at least float32;
    # float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------
# SFT (eq. 1)
# ---------------------------------------------------------------------------


def sft_loss(logits: Tensor, labels_mask: Tensor, input_ids: Tensor) -> Tensor:
    """Mean token NLL over all response tokens of the batch (token-level mean).

    logits [B,T,V] with logits[:, t] predicting input_ids[:, t+1]; labels_mask [B,T]
    is 1 on response tokens. A mask on token 0 is ignored (nothing predicts it).
    Returns 0 (still attached to the graph) when the batch has no response token.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or labels_mask.shape != input_ids.shape:
        raise ValueError(
            f"sft_loss: expected logits [B,T,V], input_ids and labels_mask [B,T]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(labels_mask.shape)}"
        )
    sel = labels_mask[:, 1:].bool()
    # Select the predicting rows first, then upcast: only N_response x V floats in
    # float32, not the whole B x T x V tensor.
    rows = logits[:, :-1][sel].to(_compute_dtype(logits.dtype))
    targets = input_ids[:, 1:][sel]
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(rows, targets, reduction="mean")


# ---------------------------------------------------------------------------
# Slot distributions
# ---------------------------------------------------------------------------


def slot_probabilities(
    logits: Tensor, slot_positions: Tensor, identifier_ids: Tensor, mode: str = "vocab"
) -> Tensor:
    """y [B,K,C]: y[b,k,i] = P(slot k emits candidate i's identifier).

    slot_positions [B,K]: index in input_ids of slot k's identifier token, so the
    predicting row is logits[:, pos-1]. identifier_ids [C] or [B,C].
    mode "vocab": softmax over the full vocabulary (paper); "identifiers":
    softmax over the C identifier logits only (rows sum to 1).
    """
    if mode not in ("vocab", "identifiers"):
        raise ValueError(f"slot_probabilities: mode must be 'vocab' or 'identifiers', got {mode!r}")
    B, T, V = logits.shape
    if slot_positions.dim() != 2 or slot_positions.shape[0] != B:
        raise ValueError(f"slot_probabilities: slot_positions must be [B,K] with B={B}, got {tuple(slot_positions.shape)}")
    K = slot_positions.shape[1]
    if identifier_ids.dim() == 1:
        identifier_ids = identifier_ids.unsqueeze(0).expand(B, -1)
    if identifier_ids.dim() != 2 or identifier_ids.shape[0] != B:
        raise ValueError(f"slot_probabilities: identifier_ids must be [C] or [B,C], got {tuple(identifier_ids.shape)}")
    C = identifier_ids.shape[1]
    if slot_positions.numel() and (int(slot_positions.min()) < 1 or int(slot_positions.max()) >= T):
        raise ValueError(
            f"slot_probabilities: slot positions must lie in [1, {T - 1}] (position 0 has no predicting logits)"
        )
    pred_pos = (slot_positions - 1).long()
    # Gather the K predicting rows before any softmax: O(B*K*V) memory, not O(B*T*V).
    rows = logits.gather(1, pred_pos.unsqueeze(-1).expand(B, K, V)).to(_compute_dtype(logits.dtype))
    ids = identifier_ids.long().unsqueeze(1).expand(B, K, C)
    if mode == "vocab":
        return rows.log_softmax(dim=-1).gather(2, ids).exp()
    return rows.gather(2, ids).softmax(dim=-1)


def soft_positions(slot_probs: Tensor, gamma: float) -> Tensor:
    """Soft position s [B,C] of each item (1 = top): w = softmax_k(gamma*y), s_i = sum_k k*w[k,i]."""
    if slot_probs.dim() != 3:
        raise ValueError(f"soft_positions: expected [B,K,C], got {tuple(slot_probs.shape)}")
    K = slot_probs.shape[1]
    w = torch.softmax(gamma * slot_probs, dim=1)  # over slots k, per item i
    k = torch.arange(1, K + 1, dtype=w.dtype, device=w.device)
    return (w * k.view(1, K, 1)).sum(dim=1)


# ---------------------------------------------------------------------------
# Soft lambda loss (eqs. 2-4)
# ---------------------------------------------------------------------------


def predicted_ranks(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """1-based rank [B,C] of each item by score, highest first; ties broken by index.

    Masked-out items are placed after all valid ones. No gradient.
    """
    with torch.no_grad():
        s = scores.detach()
        if mask is not None:
            s = s.masked_fill(~mask.bool(), float("-inf"))
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        pos = torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order)
        ranks.scatter_(-1, order, pos)
    return ranks


def lambda_loss(scores: Tensor, relevance: Tensor, sigma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """LambdaLoss with NDCG-Loss2 weights (Wang et al. 2018), spec §3.

    scores [B,C] (higher = better), relevance [B,C] graded, mask [B,C] bool
    (False = padded candidate, left out of pairs and IDCG). Sum over pairs with
    r_i > r_j, mean over lists; a list with IDCG == 0 contributes 0 but counts.
    Gradient flows only through the pairwise softplus, not the sort or weights.
    """
    if scores.dim() != 2 or relevance.shape != scores.shape:
        raise ValueError(
            f"lambda_loss: scores and relevance must both be [B,C]; got {tuple(scores.shape)}, {tuple(relevance.shape)}"
        )
    dtype = _compute_dtype(scores.dtype)
    f = scores.to(dtype)
    rel = relevance.to(dtype)
    valid = torch.ones_like(rel, dtype=torch.bool) if mask is None else mask.bool()
    C = f.shape[-1]

    with torch.no_grad():
        gains = torch.where(valid, torch.pow(2.0, rel) - 1.0, torch.zeros_like(rel))
        ideal = torch.sort(gains, dim=-1, descending=True).values
        disc = torch.log2(torch.arange(2, C + 2, dtype=dtype, device=f.device))
        idcg = (ideal / disc).sum(dim=-1, keepdim=True)
        has_gain = idcg > 0
        G = torch.where(has_gain, gains / torch.where(has_gain, idcg, torch.ones_like(idcg)), torch.zeros_like(gains))

        ranks = predicted_ranks(f, valid).to(dtype)
        d = (ranks.unsqueeze(-1) - ranks.unsqueeze(-2)).abs()
        # d == 0 only on the diagonal, which the pair mask drops; clamp to avoid 1/log2(1) = inf.
        d = d.clamp_min(1.0)
        delta = (1.0 / torch.log2(1.0 + d) - 1.0 / torch.log2(2.0 + d)).abs()

        pair = (rel.unsqueeze(-1) > rel.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
        weight = delta * (G.unsqueeze(-1) - G.unsqueeze(-2)).abs() * pair.to(dtype)

    diff = f.unsqueeze(-1) - f.unsqueeze(-2)  # f_i - f_j
    # log2(1 + exp(-sigma*diff)) = softplus(-sigma*diff)/ln 2, stable for large |diff|.
    pair_loss = F.softplus(-sigma * diff) / _LN2
    per_list = (weight * pair_loss).sum(dim=(-1, -2))
    return per_list.mean()


def rank_loss_from_slots(
    slot_probs: Tensor, relevance: Tensor, gamma: float, sigma: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Soft lambda loss as training uses it: lambda_loss(-soft_positions(y, gamma), relevance)."""
    return lambda_loss(-soft_positions(slot_probs, gamma), relevance, sigma=sigma, mask=mask)


# ---------------------------------------------------------------------------
# Losses on per-candidate scores (the score head, docs/method.md "Score head")
# ---------------------------------------------------------------------------


def listnet_loss(scores: Tensor, relevance: Tensor) -> Tensor:
    """ListNet, top-one (Cao et al. 2007): mean_b -sum_i softmax(relevance)_i log softmax(scores)_i."""
    if scores.dim() != 2 or relevance.shape != scores.shape:
        raise ValueError(f"listnet_loss: scores and relevance must both be [B,C]; got "
                         f"{tuple(scores.shape)}, {tuple(relevance.shape)}")
    dtype = _compute_dtype(scores.dtype)
    target = relevance.to(dtype).softmax(dim=-1)
    return -(target * scores.to(dtype).log_softmax(dim=-1)).sum(dim=-1).mean()


def plackett_luce_loss(scores: Tensor, order: Tensor) -> Tensor:
    """ListMLE (Xia et al. 2008): minus the Plackett-Luce log-likelihood of the gold order.

    order [B,C]: candidate indices best first (the data's gold order, ties already broken).
    L = mean_b sum_k [ logsumexp_{j>=k} s[o_j] - s[o_k] ]."""
    if scores.dim() != 2 or order.shape != scores.shape:
        raise ValueError(f"plackett_luce_loss: scores and order must both be [B,C]; got "
                         f"{tuple(scores.shape)}, {tuple(order.shape)}")
    s = scores.to(_compute_dtype(scores.dtype)).gather(1, order.long())
    # logsumexp over the suffix j >= k: a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    return (tail - s).sum(dim=-1).mean()


def mse_loss(scores: Tensor, relevance: Tensor) -> Tensor:
    """Pointwise regression on the graded relevance: mean over lists and candidates of (s - r)^2.
    The score head's counterpart of SFT in the ablation (docs/method.md, "ALRO's claims")."""
    if scores.dim() != 2 or relevance.shape != scores.shape:
        raise ValueError(f"mse_loss: scores and relevance must both be [B,C]; got "
                         f"{tuple(scores.shape)}, {tuple(relevance.shape)}")
    dtype = _compute_dtype(scores.dtype)
    return (scores.to(dtype) - relevance.to(dtype)).pow(2).mean()


def score_rank_loss(name: str, scores: Tensor, relevance: Tensor, order: Tensor, sigma: float = 1.0) -> Tensor:
    """The loss `loss.score_loss` names, on head scores [B,C] (higher = better): lambda (the soft
    lambda loss of eqs. 2-4 with f = the scores), listnet, plackett_luce, or the pointwise mse."""
    if name == "mse":
        return mse_loss(scores, relevance)
    if name == "lambda":
        return lambda_loss(scores, relevance, sigma=sigma)
    if name == "listnet":
        return listnet_loss(scores, relevance)
    if name == "plackett_luce":
        return plackett_luce_loss(scores, order)
    raise ValueError(f"unknown score loss {name!r}; choose from {SCORE_LOSSES}")


def score_consistency_loss(scores: Tensor, scores_perm: Tensor, detach_reference: bool = True) -> Tensor:
    """The permutation term for scores: KL(softmax(scores) || softmax(scores_perm)), mean over lists.

    Both [B,C] in original item order (`map_scores_to_items` for the permuted pass). Zero when
    the permuted prompt gives the same scores up to a shift; with detach_reference only the
    permuted side gets a gradient (as in eq. 6)."""
    if scores.dim() != 2 or scores.shape != scores_perm.shape:
        raise ValueError(f"score_consistency_loss: inputs must both be [B,C]; got "
                         f"{tuple(scores.shape)}, {tuple(scores_perm.shape)}")
    dtype = _compute_dtype(scores.dtype)
    ref = (scores.detach() if detach_reference else scores).to(dtype).log_softmax(dim=-1)
    return (ref.exp() * (ref - scores_perm.to(dtype).log_softmax(dim=-1))).sum(dim=-1).mean()


def map_scores_to_items(scores_perm: Tensor, perm_order: Tensor) -> Tensor:
    """[B,C] scores of a permuted pass (position j shows original item perm_order[b,j]) in original item order."""
    return map_to_items(scores_perm.unsqueeze(1), perm_order).squeeze(1)


# ---------------------------------------------------------------------------
# Permutation-sensitive loss (eq. 6)
# ---------------------------------------------------------------------------


def map_to_items(slot_probs_perm: Tensor, perm_order: Tensor, check: bool = True) -> Tensor:
    """Put a permuted pass's columns back in original item order.

    perm_order[b,j] = original index of the candidate shown at permuted position j;
    out[b,k,perm_order[b,j]] = in[b,k,j]. check=True verifies each row is a permutation.
    """
    if slot_probs_perm.dim() != 3 or perm_order.shape != (slot_probs_perm.shape[0], slot_probs_perm.shape[2]):
        raise ValueError(
            f"map_to_items: expected slot_probs_perm [B,K,C] and perm_order [B,C]; got "
            f"{tuple(slot_probs_perm.shape)}, {tuple(perm_order.shape)}"
        )
    perm_order = perm_order.long()
    C = perm_order.shape[-1]
    if check:
        ar = torch.arange(C, device=perm_order.device).expand_as(perm_order)
        if not torch.equal(torch.sort(perm_order, dim=-1).values, ar):
            raise ValueError("map_to_items: each row of perm_order must be a permutation of 0..C-1")
    # inverse[b, i] = permuted position j where original item i was shown; gather keeps autograd simple.
    inverse = torch.argsort(perm_order, dim=-1)
    K = slot_probs_perm.shape[1]
    return slot_probs_perm.gather(2, inverse.unsqueeze(1).expand(-1, K, -1))


def _renormalise(p: Tensor, eps: float) -> Tensor:
    # Vocab-mode slot rows do not sum to 1 over the C candidates; the spec compares
    # distributions "each over the C candidates".
    return p / p.sum(dim=-1, keepdim=True).clamp_min(eps)


def permutation_loss(q: Tensor, q_perm: Tensor, detach_reference: bool = True, eps: float = 1e-9) -> Tensor:
    """Cross-entropy between slot distributions of the original and permuted passes.

    q, q_perm [B,K,C], already mapped to original item order. Each slot row is
    renormalised over the C candidates; L = mean_{b,k} -sum_i q log q_perm.
    With detach_reference the original side q gets no gradient (spec default).
    """
    if q.dim() != 3 or q.shape != q_perm.shape:
        raise ValueError(f"permutation_loss: q and q_perm must both be [B,K,C]; got {tuple(q.shape)}, {tuple(q_perm.shape)}")
    if detach_reference:
        q = q.detach()
    ref = _renormalise(q, eps)
    # clamp (not +eps) so that q_perm == q gives exactly the entropy of q.
    log_qp = torch.log(_renormalise(q_perm, eps).clamp_min(eps))
    return -(ref * log_qp).sum(dim=-1).mean()


def literal_permutation_loss(
    p_gold: Tensor, p_perm_gold: Tensor, detach_reference: bool = True, eps: float = 1e-9
) -> Tensor:
    """Paper's literal eq. 6 (ablation): mean_b -sum_k p_gold[b,k] * log p_perm_gold[b,k].

    p_gold [B,K]: probability of the gold identifier at slot k under the original
    prompt; p_perm_gold likewise under the permuted prompt (gold under its new letters).
    """
    if p_gold.dim() != 2 or p_gold.shape != p_perm_gold.shape:
        raise ValueError(
            f"literal_permutation_loss: inputs must both be [B,K]; got {tuple(p_gold.shape)}, {tuple(p_perm_gold.shape)}"
        )
    if detach_reference:
        p_gold = p_gold.detach()
    return -(p_gold * torch.log(p_perm_gold.clamp_min(eps))).sum(dim=-1).mean()


# ---------------------------------------------------------------------------
# Objective (eq. 7)
# ---------------------------------------------------------------------------


@dataclass
class LossTerms:
    """The objective and its parts (rank/perm are zero tensors when not computed)."""

    total: Tensor
    sft: Tensor
    rank: Tensor
    perm: Tensor


def alro_loss(sft: Tensor | None, rank: Tensor | None, perm: Tensor | None, alpha: float, beta: float,
              sft_weight: float = 1.0) -> LossTerms:
    """total = sft_weight*sft + alpha*rank + beta*perm: eq. 7 at sft_weight 1 (the generative
    objective); the score objective weights SFT as an auxiliary (loss.sft_weight, often 0).

    The one place the weighted total is composed. A term whose weight is 0 is left out of total
    entirely (so a NaN in an unused term cannot poison it) and may be passed as None; None with
    a nonzero weight is an error. Reported terms that were not computed are zeros.
    """
    parts = []
    for name, weight, term in (("sft_weight", sft_weight, sft), ("alpha", alpha, rank), ("beta", beta, perm)):
        if weight == 0:
            continue
        if term is None:
            raise ValueError(f"alro_loss: {name}={weight} but that loss was not computed")
        parts.append(term if weight == 1 else weight * term)
    given = next(t for t in (sft, rank, perm) if t is not None)
    zero = given.new_zeros(())
    total = parts[0] if parts else 0.0 * given  # every weight 0: a zero that still back-propagates
    for part in parts[1:]:
        total = total + part
    return LossTerms(
        total=total,
        sft=zero if sft is None else sft,
        rank=zero if rank is None else rank,
        perm=zero if perm is None else perm,
    )
