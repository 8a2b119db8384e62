"""Numeric tests of alro_ray.train.losses (ALRO_SPEC.md §3).

Every expected number is worked out by hand in a comment and recomputed with the
`math` module, never by calling the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.autograd import gradcheck

from alro_ray.train.losses import (
    LossTerms,
    alro_loss,
    lambda_loss,
    listnet_loss,
    literal_permutation_loss,
    map_scores_to_items,
    map_to_items,
    mse_loss,
    permutation_loss,
    plackett_luce_loss,
    predicted_ranks,
    rank_loss_from_slots,
    score_consistency_loss,
    score_rank_loss,
    sft_loss,
    slot_probabilities,
    soft_positions,
)

D64 = torch.float64
LN = math.log
LOG2 = math.log2


def t(x, dtype=D64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------
# sft_loss
# ---------------------------------------------------------------------------


def test_sft_loss_hand_example_token_level_mean():
    # V = 3, T = 3.
    # Seq 0: ids [0,1,2], response = tokens 1,2.
    #   token 1 predicted by logits[0,0] = [0,0,0]        -> P = 1/3          -> NLL ln 3
    #   token 2 predicted by logits[0,1] = [0,ln3,0]      -> P = 1/(1+3+1)    -> NLL ln 5
    #   logits[0,2] predicts nothing inside the sequence (set to garbage).
    # Seq 1: ids [2,0,1], response = token 1 only (token 2 is padding, mask 0).
    #   token 1 (id 0) predicted by logits[1,0] = [ln3,0,0] -> P = 3/5        -> NLL ln(5/3)
    # Token-level mean over the 3 response tokens: (ln3 + ln5 + ln(5/3)) / 3 = 2 ln5 / 3.
    # (Mean of per-sequence means would be (ln15/2 + ln(5/3))/2, which differs.)
    logits = t(
        [
            [[0, 0, 0], [0, LN(3), 0], [50, -50, 7]],
            [[LN(3), 0, 0], [-40, 40, 0], [9, 9, -9]],
        ]
    )
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    got = sft_loss(logits, mask, ids)
    assert got.item() == pytest.approx(2 * LN(5) / 3, abs=1e-12)
    assert got.item() != pytest.approx((LN(15) / 2 + LN(5 / 3)) / 2, abs=1e-6)


def test_sft_loss_ignores_mask_on_first_token_and_upcasts_bf16():
    # Mask on token 0 has no predicting logits: must be ignored, not wrap around.
    logits = t([[[0, 0, 0], [0, LN(3), 0], [0, 0, 0]]])
    ids = torch.tensor([[1, 1, 2]])
    mask = torch.tensor([[1, 0, 1]])
    # Only token 2 counts: P = 1/5 under logits[0,1].
    assert sft_loss(logits, mask, ids).item() == pytest.approx(LN(5), abs=1e-12)
    out = sft_loss(logits.to(torch.bfloat16), mask, ids)
    assert out.dtype == torch.float32


def test_sft_loss_empty_mask_is_zero_and_differentiable():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    out = sft_loss(logits, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    assert logits.grad is not None


# ---------------------------------------------------------------------------
# slot_probabilities
# ---------------------------------------------------------------------------


def _slot_logits():
    # B=1, T=4, V=4; identifiers of candidates 0,1 are token ids 1,2; slots at positions 2,3.
    # Slot 1 (pos 2) is predicted by row 1 = [0, ln2, 0, 0]:
    #   vocab: exp sum = 1+2+1+1 = 5 -> y[0] = [2/5, 1/5]; identifiers: [2/3, 1/3]
    # Slot 2 (pos 3) is predicted by row 2 = [ln4, 0, ln3, 0]:
    #   vocab: exp sum = 4+1+3+1 = 9 -> y[1] = [1/9, 3/9]; identifiers: [1/4, 3/4]
    # Rows 0 and 3 hold decoys: reading at pos instead of pos-1 would pick row 3.
    return t(
        [
            [
                [9, -9, 9, 0],
                [0, LN(2), 0, 0],
                [LN(4), 0, LN(3), 0],
                [0, 20, -20, 0],
            ]
        ]
    )


def test_slot_probabilities_vocab_hand_example():
    y = slot_probabilities(_slot_logits(), torch.tensor([[2, 3]]), torch.tensor([1, 2]), mode="vocab")
    expected = t([[[2 / 5, 1 / 5], [1 / 9, 3 / 9]]])
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_slot_probabilities_identifiers_hand_example_rows_sum_to_one():
    y = slot_probabilities(_slot_logits(), torch.tensor([[2, 3]]), torch.tensor([1, 2]), mode="identifiers")
    expected = t([[[2 / 3, 1 / 3], [1 / 4, 3 / 4]]])
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 12, 30, generator=g)
    pos = torch.tensor([[3, 5, 7, 9], [1, 2, 3, 4], [8, 9, 10, 11]])
    ids = torch.tensor([[4, 9, 2, 17], [0, 1, 2, 3], [29, 28, 27, 26]])
    yi = slot_probabilities(big, pos, ids, mode="identifiers")
    torch.testing.assert_close(yi.sum(-1), torch.ones(3, 4))
    # vocab-mode rows only cover part of the vocabulary: strictly below 1.
    yv = slot_probabilities(big, pos, ids, mode="vocab")
    assert (yv.sum(-1) < 1).all()


def test_slot_probabilities_reads_logits_at_pos_minus_one():
    # Off-by-one guard: each row r of the logits favours a different identifier
    # (row r puts +10 on identifier r % C). Slot at position p must follow row p-1.
    T, V, C = 6, 8, 3
    ids = torch.tensor([5, 6, 7])
    logits = torch.zeros(1, T, V, dtype=D64)
    for r in range(T):
        logits[0, r, ids[r % C]] = 10.0
    pos = torch.tensor([[1, 2, 4]])
    y = slot_probabilities(logits, pos, ids, mode="identifiers")
    assert y.argmax(-1).tolist() == [[0 % C, 1 % C, 3 % C]]
    with pytest.raises(ValueError):
        slot_probabilities(logits, torch.tensor([[0, 1, 2]]), ids)
    with pytest.raises(ValueError):
        slot_probabilities(logits, torch.tensor([[1, 2, T]]), ids)


def test_slot_probabilities_per_list_identifier_ids():
    # identifier_ids [B,C]: each list's own letters. Same logits row, swapped ids.
    logits = t([[[0, LN(2), LN(6), 0], [0, 0, 0, 0]]] * 2)
    pos = torch.tensor([[1], [1]])
    ids = torch.tensor([[1, 2], [2, 1]])
    y = slot_probabilities(logits, pos, ids, mode="identifiers")
    # exp: id1 -> 2, id2 -> 6: list 0 [2/8, 6/8], list 1 [6/8, 2/8]
    torch.testing.assert_close(y, t([[[0.25, 0.75]], [[0.75, 0.25]]]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["vocab", "identifiers"])
def test_slot_probabilities_gradcheck(mode):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, dtype=D64, generator=g, requires_grad=True)
    pos = torch.tensor([[1, 3, 4], [2, 3, 4]])
    ids = torch.tensor([0, 3, 5])
    assert gradcheck(lambda x: slot_probabilities(x, pos, ids, mode=mode), (logits,))


# ---------------------------------------------------------------------------
# soft_positions
# ---------------------------------------------------------------------------


def test_soft_positions_2x2_hand_example():
    # y = [[1,0],[0,1]]: slot 1 emits item 0, slot 2 emits item 1. gamma = ln 3.
    # item 0: softmax_k([ln3*1, ln3*0]) = [3/4, 1/4] -> s = 1*3/4 + 2*1/4 = 5/4
    # item 1: softmax_k([0, ln3])       = [1/4, 3/4] -> s = 1/4 + 2*3/4   = 7/4
    y = t([[[1, 0], [0, 1]]])
    torch.testing.assert_close(soft_positions(y, LN(3)), t([[5 / 4, 7 / 4]]), atol=1e-12, rtol=0)
    # y = [[1,1],[0,0]]: both items favour slot 1 (the softmax is per item, over slots):
    #   each item: softmax_k([ln3, 0]) = [3/4, 1/4] -> s = 5/4 for both.
    #   (Normalising over items instead would give 1.5 each.)
    torch.testing.assert_close(soft_positions(t([[[1, 1], [0, 0]]]), LN(3)), t([[5 / 4, 5 / 4]]), atol=1e-12, rtol=0)
    # gamma = 0: uniform over slots -> every item sits at the mean slot 1.5.
    torch.testing.assert_close(soft_positions(y, 0.0), t([[1.5, 1.5]]), atol=1e-12, rtol=0)


def test_soft_positions_tends_to_argmax_slot_as_gamma_grows():
    # Column i's largest entry is at slot argmax_slot[i] (1-based): 3, 1, 4, 3.
    # (Row argmaxes differ: slot 3's largest entry is item 3, so normalising over
    # items instead of slots would give other positions.)
    y = t(
        [
            [
                [0.10, 0.60, 0.05, 0.25],
                [0.20, 0.15, 0.15, 0.50],
                [0.55, 0.10, 0.05, 0.70],
                [0.15, 0.15, 0.75, 0.00],
            ]
        ]
    )
    argmax_slot = t([[3, 1, 4, 3]])
    errs = [(soft_positions(y, g) - argmax_slot).abs().max().item() for g in (1.0, 10.0, 100.0, 1000.0)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6
    assert errs[0] > 0.5  # at small gamma it is far from hard argmax


def test_soft_positions_gradcheck():
    g = torch.Generator().manual_seed(2)
    y = torch.rand(2, 4, 4, dtype=D64, generator=g, requires_grad=True)
    assert gradcheck(lambda x: soft_positions(x, 2.0), (y,))


# ---------------------------------------------------------------------------
# lambda_loss
# ---------------------------------------------------------------------------

# Shared hand-worked constants. D(n) = log2(1+n).
#   d1 = |1/D(1) - 1/D(2)| = 1 - 1/log2(3)          ~ 0.369070
#   d2 = |1/D(2) - 1/D(3)| = 1/log2(3) - 1/2         ~ 0.130930
D1 = 1 - 1 / LOG2(3)
D2 = 1 / LOG2(3) - 0.5


def _lg(x):  # log2(1 + exp(-x)) for x = sigma*(f_i - f_j)
    return LOG2(1 + math.exp(-x))


def test_lambda_loss_hand_example_c3():
    # ratings r = [3,1,2], scores f = [0.5, 1.0, 0.0].
    # Sort by f desc: item1 (1.0), item0 (0.5), item2 (0.0) -> pi = [2, 1, 3].
    # Raw gains 2^r-1 = [7, 1, 3]. Ideal order 7,3,1:
    #   IDCG = 7/log2(2) + 3/log2(3) + 1/log2(4) = 7 + 1.892789 + 0.5 = 9.392789
    # Pairs with r_i > r_j:
    #   (0,1): |pi| = |2-1| = 1 -> d1; |G0-G1| = 6/IDCG; f0-f1 = -0.5 -> log2(1+e^0.5)  ~ 1.405296
    #   (0,2): |pi| = |2-3| = 1 -> d1; |G0-G2| = 4/IDCG; f0-f2 = +0.5 -> log2(1+e^-0.5) ~ 0.683949
    #   (2,1): |pi| = |3-1| = 2 -> d2; |G2-G1| = 2/IDCG; f2-f1 = -1.0 -> log2(1+e^1)    ~ 1.894636
    # L = [d1*6*1.405300 + d1*4*0.683555 + d2*2*1.894228] / IDCG
    #   = [3.111918 + 1.009700 + 0.496128] / 9.392789 = 4.617746 / 9.392789 ~ 0.491627
    idcg = 7 + 3 / LOG2(3) + 1 / LOG2(4)
    expected = (D1 * 6 * _lg(-0.5) + D1 * 4 * _lg(0.5) + D2 * 2 * _lg(-1.0)) / idcg
    assert expected == pytest.approx(0.491627, abs=1e-6)  # the comment's arithmetic
    got = lambda_loss(t([[0.5, 1.0, 0.0]]), t([[3, 1, 2]]))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert predicted_ranks(t([[0.5, 1.0, 0.0]])).tolist() == [[2, 1, 3]]


def test_lambda_loss_sigma_scales_the_logistic_term():
    # Same list with sigma = 2: each log term becomes log2(1 + exp(-2 (f_i - f_j))).
    idcg = 7 + 3 / LOG2(3) + 1 / LOG2(4)
    expected = (D1 * 6 * _lg(-1.0) + D1 * 4 * _lg(1.0) + D2 * 2 * _lg(-2.0)) / idcg
    got = lambda_loss(t([[0.5, 1.0, 0.0]]), t([[3, 1, 2]]), sigma=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_lambda_loss_ties_broken_stably_by_index():
    # f = [0, 0, -1], r = [1, 2, 3]. Stable tie-break: pi = [1, 2, 3] (a reversed
    # tie-break would give [2, 1, 3] and a different value).
    # Gains [1, 3, 7], IDCG = 7 + 3/log2(3) + 1/2.
    #   (1,0): |2-1| = 1 -> d1, |dG| = 2, f1-f0 = 0  -> log2(2) = 1
    #   (2,0): |3-1| = 2 -> d2, |dG| = 6, f2-f0 = -1 -> log2(1+e)
    #   (2,1): |3-2| = 1 -> d1, |dG| = 4, f2-f1 = -1 -> log2(1+e)
    idcg = 7 + 3 / LOG2(3) + 0.5
    stable = (D1 * 2 * 1 + D2 * 6 * _lg(-1) + D1 * 4 * _lg(-1)) / idcg
    reversed_tie = (D1 * 2 * 1 + D1 * 6 * _lg(-1) + D2 * 4 * _lg(-1)) / idcg
    assert abs(stable - reversed_tie) > 1e-3
    got = lambda_loss(t([[0.0, 0.0, -1.0]]), t([[1, 2, 3]]))
    assert got.item() == pytest.approx(stable, abs=1e-12)


def test_lambda_loss_zero_when_perfect_with_huge_margins():
    rel = t([[5, 4, 3, 2, 1]])
    scores = t([[400.0, 300.0, 200.0, 100.0, 0.0]]).requires_grad_(True)
    loss = lambda_loss(scores, rel)
    loss.backward()
    assert loss.item() < 1e-30
    assert scores.grad.abs().max().item() < 1e-30
    # ...while the reversed order with the same margins is large, with large gradient.
    rev = t([[0.0, 100.0, 200.0, 300.0, 400.0]]).requires_grad_(True)
    lr = lambda_loss(rev, rel)
    lr.backward()
    assert lr.item() > 10
    assert rev.grad.abs().max().item() > 0.01


def test_lambda_loss_grows_with_every_extra_inversion():
    # Scores put items in a given order with margin 5 between neighbours. From
    # every permutation of 5 items (ratings 5..1), swapping an adjacent,
    # correctly ordered pair into the wrong order must increase the loss.
    rel = t([[5, 4, 3, 2, 1]])

    def loss_of(order):
        s = torch.zeros(1, 5, dtype=D64)
        for rank, item in enumerate(order):
            s[0, item] = -5.0 * rank
        return lambda_loss(s, rel).item()

    cache = {p: loss_of(p) for p in itertools.permutations(range(5))}
    checked = 0
    for p, lp in cache.items():
        for j in range(4):
            if p[j] < p[j + 1]:  # currently correct (item p[j] has higher rating)
                q = list(p)
                q[j], q[j + 1] = q[j + 1], q[j]
                assert cache[tuple(q)] > lp, (p, q)
                checked += 1
    assert checked == 240
    assert max(cache.values()) == cache[(4, 3, 2, 1, 0)]
    assert min(cache.values()) == cache[(0, 1, 2, 3, 4)]


def test_lambda_loss_zero_idcg_list_counts_in_average():
    scores = t([[0.5, 1.0, 0.0], [0.3, 0.2, 0.1]])
    rel = t([[3, 1, 2], [0, 0, 0]])  # second list: all gains 2^0-1 = 0 -> IDCG = 0
    single = lambda_loss(scores[:1], rel[:1]).item()
    got = lambda_loss(scores, rel)
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(single / 2, abs=1e-12)


def test_lambda_loss_mask_equals_trimmed_list():
    # A padded slot (masked out) with a huge rating and best score must change nothing.
    scores = t([[0.5, 9.0, 1.0, 0.0]])
    rel = t([[3, 5, 1, 2]])
    mask = torch.tensor([[True, False, True, True]])
    got = lambda_loss(scores, rel, mask=mask)
    trimmed = lambda_loss(t([[0.5, 1.0, 0.0]]), t([[3, 1, 2]]))
    assert got.item() == pytest.approx(trimmed.item(), abs=1e-12)
    assert lambda_loss(scores, rel).item() != pytest.approx(trimmed.item(), abs=1e-6)


def test_lambda_loss_gradcheck_wrt_scores():
    # Distinct, well-separated scores so the (non-differentiated) sort is locally constant.
    scores = t([[0.3, -1.2, 2.1, 0.9], [1.5, 0.2, -0.7, -2.0]]).requires_grad_(True)
    rel = t([[2, 5, 1, 3], [1, 4, 4, 2]])
    assert gradcheck(lambda s: lambda_loss(s, rel, sigma=1.3), (scores,))


def test_rank_loss_from_slots_flows_into_slot_probs_and_prefers_gold_order():
    # Gold order is item 0 > 1 > 2. A slot matrix emitting them in that order
    # beats the reversed one, and gradient reaches slot_probs.
    rel = t([[3, 2, 1]])
    good = torch.eye(3, dtype=D64).unsqueeze(0).requires_grad_(True)
    bad = torch.eye(3, dtype=D64).flip(-1).unsqueeze(0)
    lg = rank_loss_from_slots(good, rel, gamma=2.0)
    lb = rank_loss_from_slots(bad, rel, gamma=2.0)
    assert lg.item() < lb.item()
    lg.backward()
    assert good.grad.abs().sum().item() > 0
    # It is lambda_loss on f = -s: check against the hand-worked soft positions for gamma = 2.
    # Column i of eye(3): softmax_k over [2,0,0] (in some order) -> weights e^2/(e^2+2), 1/(e^2+2).
    e2 = math.exp(2)
    w_hi, w_lo = e2 / (e2 + 2), 1 / (e2 + 2)
    s = [1 * w_hi + 2 * w_lo + 3 * w_lo, 1 * w_lo + 2 * w_hi + 3 * w_lo, 1 * w_lo + 2 * w_lo + 3 * w_hi]
    assert lg.item() == pytest.approx(lambda_loss(-t([s]), rel).item(), abs=1e-12)


# ---------------------------------------------------------------------------
# map_to_items
# ---------------------------------------------------------------------------


def test_map_to_items_hand_example():
    # perm_order = [2, 0, 1]: permuted position 0 shows original item 2, position 1
    # item 0, position 2 item 1. A row [a, b, c] (by permuted position) maps to
    # out[2] = a, out[0] = b, out[1] = c -> [b, c, a].
    x = t([[[10, 20, 30], [1, 2, 3]]])
    out = map_to_items(x, torch.tensor([[2, 0, 1]]))
    torch.testing.assert_close(out, t([[[20, 30, 10], [2, 3, 1]]]), atol=0, rtol=0)


def test_map_to_items_round_trip_and_rejects_non_permutation():
    g = torch.Generator().manual_seed(3)
    y = torch.rand(2, 4, 4, generator=g)
    perm = torch.stack([torch.randperm(4, generator=g) for _ in range(2)])
    # The permuted pass shows original item perm[b, j] at position j.
    y_perm = torch.stack([y[b][:, perm[b]] for b in range(2)])
    torch.testing.assert_close(map_to_items(y_perm, perm), y, atol=0, rtol=0)
    with pytest.raises(ValueError):
        map_to_items(y_perm, torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]))


# ---------------------------------------------------------------------------
# permutation_loss
# ---------------------------------------------------------------------------


def test_permutation_loss_2x2_hand_example():
    # K = 2 slots, C = 2 items.
    #   slot 1: q = [1/2, 1/2], q' = [1/4, 3/4] -> -(1/2 ln 1/4 + 1/2 ln 3/4) = 1/2 ln(16/3) ~ 0.836988
    #   slot 2: q = [3/4, 1/4], q' = [1/2, 1/2] -> -(3/4 + 1/4) ln 1/2        = ln 2         ~ 0.693147
    # mean over slots ~ 0.765068
    expected = (0.5 * LN(16 / 3) + LN(2)) / 2
    assert expected == pytest.approx(0.765068, abs=1e-6)
    q = t([[[0.5, 0.5], [0.75, 0.25]]])
    qp = t([[[0.25, 0.75], [0.5, 0.5]]])
    assert permutation_loss(q, qp).item() == pytest.approx(expected, abs=1e-12)
    # Rows are renormalised over the C candidates (vocab-mode rows sum below 1).
    scaled = permutation_loss(q * t([[[0.2], [0.7]]]), qp * t([[[0.1], [0.3]]]))
    assert scaled.item() == pytest.approx(expected, abs=1e-12)


def test_permutation_loss_minimal_at_entropy_when_passes_agree():
    g = torch.Generator().manual_seed(4)
    B, C = 2, 5
    q = torch.softmax(torch.randn(B, C, C, generator=g, dtype=D64), -1)
    # Entropy of q, mean over b, k.
    entropy = -(q * q.log()).sum(-1).mean().item()
    perm = torch.stack([torch.randperm(C, generator=g) for _ in range(B)])
    # A perfectly permutation-invariant model: the permuted pass emits, at position j,
    # exactly what the original pass gives item perm[b, j].
    q_perm_pass = torch.stack([q[b][:, perm[b]] for b in range(B)])
    aligned = permutation_loss(q, map_to_items(q_perm_pass, perm))
    assert aligned.item() == pytest.approx(entropy, abs=1e-12)
    # Forgetting to map back (position-biased comparison) costs more...
    assert permutation_loss(q, q_perm_pass).item() > entropy + 1e-3
    # ...and so does any other distribution.
    for _ in range(5):
        other = torch.softmax(torch.randn(B, C, C, generator=g, dtype=D64), -1)
        assert permutation_loss(q, other).item() > entropy


def test_permutation_loss_detach_reference_stops_gradient_into_q():
    g = torch.Generator().manual_seed(5)
    q = torch.softmax(torch.randn(1, 3, 3, generator=g, dtype=D64), -1).requires_grad_(True)
    qp = torch.softmax(torch.randn(1, 3, 3, generator=g, dtype=D64), -1).requires_grad_(True)
    permutation_loss(q, qp, detach_reference=True).backward()
    assert q.grad is None
    assert qp.grad.abs().sum().item() > 0
    qp.grad = None
    permutation_loss(q, qp, detach_reference=False).backward()
    assert q.grad is not None and q.grad.abs().sum().item() > 0


def test_permutation_loss_gradcheck_wrt_q_perm():
    g = torch.Generator().manual_seed(6)
    q = torch.rand(2, 3, 3, generator=g, dtype=D64) + 0.1
    qp = (torch.rand(2, 3, 3, generator=g, dtype=D64) + 0.1).requires_grad_(True)
    assert gradcheck(lambda x: permutation_loss(q, x), (qp,))
    qr = q.clone().requires_grad_(True)
    assert gradcheck(lambda a, b: permutation_loss(a, b, detach_reference=False), (qr, qp))


def test_literal_permutation_loss_hand_example():
    # List 0: p = [1/2, 1/4], p' = [1/4, 1/2] -> -(1/2 ln 1/4 + 1/4 ln 1/2) = (1 + 1/4) ln 2
    # List 1: p = [1, 1],     p' = [1, 1/e]   -> -(0 + 1*(-1))             = 1
    # mean over lists = (1.25 ln 2 + 1) / 2 ~ 0.933217
    expected = (1.25 * LN(2) + 1) / 2
    assert expected == pytest.approx(0.933217, abs=1e-6)
    p = t([[0.5, 0.25], [1.0, 1.0]]).requires_grad_(True)
    pp = t([[0.25, 0.5], [1.0, math.exp(-1)]]).requires_grad_(True)
    out = literal_permutation_loss(p, pp)
    assert out.item() == pytest.approx(expected, abs=1e-12)
    out.backward()
    assert p.grad is None and pp.grad is not None
    literal_permutation_loss(p, pp, detach_reference=False).backward()
    assert p.grad is not None


# ---------------------------------------------------------------------------
# alro_loss
# ---------------------------------------------------------------------------


def test_alro_loss_weights_and_missing_terms():
    sft, rank, perm = t(2.0), t(3.0), t(5.0)
    terms = alro_loss(sft, rank, perm, alpha=0.1, beta=0.01)
    assert isinstance(terms, LossTerms)
    assert terms.total.item() == pytest.approx(2.0 + 0.3 + 0.05, abs=1e-12)
    assert (terms.sft.item(), terms.rank.item(), terms.perm.item()) == (2.0, 3.0, 5.0)
    # Plain SFT: unused terms are zero tensors and a NaN in an unused term is ignored.
    plain = alro_loss(sft, None, t(float("nan")), alpha=0.0, beta=0.0)
    assert plain.total.item() == 2.0
    assert plain.rank.item() == 0.0 and torch.is_tensor(plain.rank)
    with pytest.raises(ValueError):
        alro_loss(sft, None, perm, alpha=0.1, beta=0.01)
    with pytest.raises(ValueError):
        alro_loss(sft, rank, None, alpha=0.1, beta=0.01)


def test_alro_loss_weights_sft_as_the_score_objective_does():
    sft, rank, perm = t(2.0), t(3.0), t(5.0)
    # loss.sft_weight 0.5 with the score objective: 0.5*2 + 1*3 + 0.01*5
    assert alro_loss(sft, rank, perm, alpha=1.0, beta=0.01, sft_weight=0.5).total.item() == pytest.approx(4.05)
    # The frozen-LM path: no SFT at all (None), a NaN SFT would be left out as well.
    frozen = alro_loss(None, rank, None, alpha=0.5, beta=0.0, sft_weight=0.0)
    assert frozen.total.item() == 1.5 and frozen.sft.item() == 0.0
    assert alro_loss(t(float("nan")), rank, None, alpha=1.0, beta=0.0, sft_weight=0.0).total.item() == 3.0
    with pytest.raises(ValueError, match="sft_weight"):
        alro_loss(None, rank, None, alpha=1.0, beta=0.0)
    # Every weight 0: a zero total that still back-propagates (the engine's backward needs a graph).
    r = torch.tensor(3.0, dtype=D64, requires_grad=True)
    zero = alro_loss(None, r, None, alpha=0.0, beta=0.0, sft_weight=0.0).total
    zero.backward()
    assert zero.item() == 0.0 and r.grad.item() == 0.0


def test_full_objective_backpropagates_to_logits():
    # End to end on a toy batch: every term sends gradient into the logits.
    g = torch.Generator().manual_seed(7)
    B, T, V = 2, 8, 10
    logits = torch.randn(B, T, V, generator=g, dtype=D64, requires_grad=True)
    logits_p = torch.randn(B, T, V, generator=g, dtype=D64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, 5:] = 1
    pos = torch.tensor([[5, 6, 7], [5, 6, 7]])
    letters = torch.tensor([2, 3, 4])
    y = slot_probabilities(logits, pos, letters)
    y_p = map_to_items(slot_probabilities(logits_p, pos, letters), torch.tensor([[1, 2, 0], [2, 0, 1]]))
    rel = t([[5, 1, 3], [2, 4, 1]])
    for alpha, beta in [(0.0, 0.0), (0.1, 0.0), (0.0, 0.01)]:
        logits.grad = logits_p.grad = None
        terms = alro_loss(
            sft_loss(logits, mask, ids),
            rank_loss_from_slots(y, rel, gamma=2.0) if alpha else None,
            permutation_loss(y, y_p) if beta else None,
            alpha,
            beta,
        )
        terms.total.backward(retain_graph=True)
        assert logits.grad.abs().sum().item() > 0
        # Only the permutation term touches the permuted pass (reference side detached).
        assert (logits_p.grad is not None) == bool(beta)


# ---------------------------------------------------------------------------
# Losses on score-head scores
# ---------------------------------------------------------------------------


def test_listnet_loss_hand_example():
    # softmax(rel [2, 1]) = [e, 1]/(e+1); softmax(scores [0, ln 2]) = [1/3, 2/3]
    e = math.e
    got = listnet_loss(t([[0.0, LN(2)]]), t([[2.0, 1.0]]))
    want = -(e / (e + 1) * LN(1 / 3) + 1 / (e + 1) * LN(2 / 3))
    assert float(got) == pytest.approx(want, abs=1e-12)


def test_listnet_loss_is_shift_invariant_and_prefers_the_relevant_item():
    rel = t([[5.0, 1.0, 3.0]])
    good, bad = t([[2.0, -2.0, 0.0]]), t([[-2.0, 2.0, 0.0]])
    assert float(listnet_loss(good, rel)) < float(listnet_loss(bad, rel))
    assert float(listnet_loss(good + 7.0, rel)) == pytest.approx(float(listnet_loss(good, rel)), abs=1e-12)


def test_mse_loss_hand_example_and_gradient():
    # lists [[1, 2], [0, 4]] against [[3, 2], [0, 1]]: squared errors 4, 0, 0, 9 -> mean 13/4;
    # d/ds_i = 2 (s_i - r_i) / 4 = [-1, 0, 0, 1.5]
    s = t([[1.0, 2.0], [0.0, 4.0]]).requires_grad_(True)
    got = mse_loss(s, t([[3.0, 2.0], [0.0, 1.0]]))
    assert float(got) == pytest.approx(13 / 4, abs=1e-12)
    got.backward()
    assert s.grad.tolist() == [[-1.0, 0.0], [0.0, 1.5]]
    assert gradcheck(lambda x: mse_loss(x, t([[0.5, -1.0, 2.0]])), (t([[0.3, 0.1, -0.7]]).requires_grad_(True),))
    with pytest.raises(ValueError, match="mse_loss"):
        mse_loss(t([[1.0, 2.0]]), t([[1.0]]))


def test_plackett_luce_loss_hand_example():
    # s = [0, ln 2, ln 3], gold order [2, 0, 1]:
    # k=1: ln(3+1+2) - ln 3 = ln 2; k=2: ln(1+2) - 0 = ln 3; k=3: 0  ->  ln 6
    got = plackett_luce_loss(t([[0.0, LN(2), LN(3)]]), torch.tensor([[2, 0, 1]]))
    assert float(got) == pytest.approx(LN(6), abs=1e-12)


def test_plackett_luce_loss_is_lowest_for_the_order_the_scores_sort_into():
    s = t([[0.3, -1.0, 2.0, 0.9]])
    by_score = torch.argsort(s, dim=-1, descending=True)
    losses = {perm: float(plackett_luce_loss(s, torch.tensor([perm])))
              for perm in itertools.permutations(range(4))}
    assert min(losses, key=losses.get) == tuple(by_score[0].tolist())


def test_score_rank_loss_dispatches_and_rejects_unknown_names():
    s, rel, order = t([[0.5, -0.2, 1.0]]), t([[3.0, 1.0, 5.0]]), torch.tensor([[2, 0, 1]])
    assert torch.equal(score_rank_loss("lambda", s, rel, order, sigma=1.5), lambda_loss(s, rel, sigma=1.5))
    assert torch.equal(score_rank_loss("listnet", s, rel, order), listnet_loss(s, rel))
    assert torch.equal(score_rank_loss("plackett_luce", s, rel, order), plackett_luce_loss(s, order))
    assert torch.equal(score_rank_loss("mse", s, rel, order), mse_loss(s, rel))
    with pytest.raises(ValueError, match="unknown score loss 'ranknet'"):
        score_rank_loss("ranknet", s, rel, order)


def test_score_consistency_loss_hand_example_zero_when_equal_up_to_a_shift():
    # p = softmax([0, ln 3]) = [1/4, 3/4], q = [3/4, 1/4]: KL = 1/4 ln(1/3) + 3/4 ln 3 = ln(3)/2
    got = score_consistency_loss(t([[0.0, LN(3)]]), t([[LN(3), 0.0]]))
    assert float(got) == pytest.approx(LN(3) / 2, abs=1e-12)
    s = t([[0.1, -2.0, 1.3]])
    assert float(score_consistency_loss(s, s + 4.0)) == pytest.approx(0.0, abs=1e-12)


def test_score_consistency_loss_detach_reference_stops_gradient_into_the_original():
    s = t([[0.1, -2.0, 1.3]]).requires_grad_()
    sp = t([[1.0, 0.0, -1.0]]).requires_grad_()
    score_consistency_loss(s, sp).backward()
    assert s.grad is None and sp.grad.abs().sum() > 0


def test_map_scores_to_items_hand_example():
    # position j shows original item perm_order[j]: item 2 got 10, item 0 got 20, item 1 got 30
    got = map_scores_to_items(t([[10.0, 20.0, 30.0]]), torch.tensor([[2, 0, 1]]))
    assert got.tolist() == [[20.0, 30.0, 10.0]]


def test_score_losses_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(2, 4, dtype=D64, requires_grad=True)
    sp = torch.randn(2, 4, dtype=D64, requires_grad=True)
    rel = t([[5.0, 1.0, 3.0, 2.0], [1.0, 4.0, 4.0, 2.0]])
    order = torch.tensor([[0, 2, 3, 1], [1, 2, 3, 0]])
    assert gradcheck(lambda x: listnet_loss(x, rel), (s,))
    assert gradcheck(lambda x: plackett_luce_loss(x, order), (s,))
    assert gradcheck(lambda a, b: score_consistency_loss(a, b, detach_reference=False), (s, sp))
