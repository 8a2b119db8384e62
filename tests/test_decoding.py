"""Constrained decoding, repair/parse of free generations, Borda and bootstrap orders."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from alro_ray.rank.decoding import (
    LETTERS,
    borda,
    constrained_greedy_order,
    constrained_pick,
    identifier_letters,
    invert,
    parse_ranking_text,
    permutations_for_bootstrap,
    repair,
)


def test_identifier_letters():
    assert identifier_letters(3) == ["A", "B", "C"]
    assert "".join(identifier_letters(26)) == LETTERS
    for bad in (0, 27, -1):
        with pytest.raises(ValueError):
            identifier_letters(bad)


def test_constrained_pick_masks_chosen_and_breaks_ties_low():
    scores = torch.tensor([[5.0, 9.0, 9.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    chosen = torch.tensor([[False, True, False, False], [True, False, False, False]])
    # row 0: best available is index 2 (index 1 is chosen); row 1: all tied -> lowest free = 1
    assert constrained_pick(scores, chosen).tolist() == [2, 1]


def test_constrained_pick_never_chosen_even_with_inf_and_nan():
    scores = torch.tensor([[float("-inf"), float("-inf"), float("-inf")],
                           [float("nan"), 0.0, float("nan")]])
    chosen = torch.tensor([[True, False, False], [False, True, False]])
    assert constrained_pick(scores, chosen).tolist() == [1, 0]
    with pytest.raises(ValueError):
        constrained_pick(scores, torch.ones(2, 3, dtype=torch.bool))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    c=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["random", "same_favourite", "constant", "integer_ties"]),
)
def test_constrained_greedy_order_is_a_permutation(batch, c, seed, mode):
    gen = torch.Generator().manual_seed(seed)
    seen_prefixes = []

    def slot_scores_fn(k, picks):
        assert picks.shape == (batch, k) and picks.dtype == torch.long
        seen_prefixes.append(picks.clone())
        if mode == "random":
            return torch.randn(batch, c, generator=gen)
        if mode == "same_favourite":  # a model stuck on candidate 0 at every slot
            s = torch.zeros(batch, c)
            s[:, 0] = 100.0
            return s
        if mode == "constant":
            return torch.zeros(batch, c)
        return torch.randint(0, 2, (batch, c), generator=gen).float()

    order = constrained_greedy_order(slot_scores_fn, batch, c)
    assert order.shape == (batch, c) and order.dtype == torch.long
    for row in order.tolist():
        assert sorted(row) == list(range(c))
    if mode in ("same_favourite", "constant"):
        assert order.tolist() == [list(range(c))] * batch  # ties -> lowest index
    # the callback saw the picks made so far
    for k, prefix in enumerate(seen_prefixes):
        assert torch.equal(prefix, order[:, :k])


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_constrained_pick_never_repeats(c, seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(3, c, dtype=torch.bool)
    for _ in range(c):
        pick = constrained_pick(torch.randn(3, c, generator=gen), chosen)
        assert not chosen[torch.arange(3), pick].any()
        chosen[torch.arange(3), pick] = True
    assert chosen.all()


def test_constrained_greedy_order_bad_shape():
    with pytest.raises(ValueError):
        constrained_greedy_order(lambda k, p: torch.zeros(2, 4), batch=2, c=3)


@pytest.mark.parametrize(
    "tokens, c, expected",
    [
        ("B A C", 3, ([1, 0, 2], False)),
        ("B B A", 3, ([1, 0, 2], True)),  # repeat dropped, C appended
        ("Z Q", 3, ([0, 1, 2], True)),  # unknown letters dropped, all appended
        ("", 3, ([0, 1, 2], True)),
        ("B D A C", 3, ([1, 0, 2], True)),  # D is beyond c=3
        ("C", 3, ([2, 0, 1], True)),
        ("B A C A", 3, ([1, 0, 2], True)),  # trailing repeat still counts as repaired
        ("A", 1, ([0], False)),
    ],
)
def test_repair(tokens, c, expected):
    assert repair(tokens.split(), c) == expected


def test_repair_example_from_brief():
    assert repair(["B", "A", "A", "Z", "C"], 3) == ([1, 0, 2], True)
    assert repair([" B", "A ", "C"], 3) == ([1, 0, 2], False)  # whitespace is not content


def test_parse_ranking_text():
    assert parse_ranking_text("(B) (A) C", 3) == ([1, 0, 2], False)
    # stray words are ignored, lowercase "a" is the article, not candidate A
    # "I" is a lone capital but not among the first c=4 letters: dropped; D never named: appended
    assert parse_ranking_text("Sure! I rank B first, then a Cat, then A and C.", 4) == (
        [1, 0, 2, 3],
        True,
    )
    text = "Sure, the best is B, then a good (C), then A."
    assert parse_ranking_text(text, 3) == ([1, 2, 0], False)
    assert parse_ranking_text("B>A>C", 3) == ([1, 0, 2], False)
    assert parse_ranking_text("Bob A1 xyz", 2) == ([0, 1], True)


def test_parse_ranking_text_uses_last_marker():
    text = (
        "Candidates: A: Heat, B: Up, C: Alien.\n"
        "Given the historical interaction, the ranking result is: C A B"
    )
    assert parse_ranking_text(text, 3) == ([2, 0, 1], False)
    assert parse_ranking_text("The ranking result is C B", 3) == ([2, 1, 0], True)


def test_borda_worked_example_with_tie():
    # positions:   cand0: 0,2 -> 2   cand1: 1,0 -> 1   cand2: 2,1 -> 3
    assert borda([[0, 1, 2], [1, 2, 0]], 3) == [1, 0, 2]
    # cand0: 0+1 = 1, cand1: 1+0 = 1 (tie -> lower index first), cand2: 2+2 = 4
    assert borda([[0, 1, 2], [1, 0, 2]], 3) == [0, 1, 2]
    assert borda([[2, 0, 1]], 3) == [2, 0, 1]
    with pytest.raises(ValueError):
        borda([[0, 0, 1]], 3)
    with pytest.raises(ValueError):
        borda([], 3)


def test_bootstrap_permutations():
    for c, p in [(5, 3), (6, 5), (10, 8), (5, 120)]:
        perms = permutations_for_bootstrap(c, p, seed=7)
        assert len(perms) == p
        assert perms[0] == list(range(c))
        for perm in perms:
            assert sorted(perm) == list(range(c))
        assert len({tuple(x) for x in perms}) == p  # all distinct, identity included
        assert permutations_for_bootstrap(c, p, seed=7) == perms  # deterministic per seed
    assert permutations_for_bootstrap(6, 1, seed=3) == [list(range(6))]
    assert permutations_for_bootstrap(8, 4, seed=1) != permutations_for_bootstrap(8, 4, seed=2)
    # fewer orders exist than requested: repeats are allowed, still valid
    small = permutations_for_bootstrap(2, 4, seed=0)
    assert len(small) == 4 and all(sorted(x) == [0, 1] for x in small)
    with pytest.raises(ValueError):
        permutations_for_bootstrap(3, 0, seed=0)


def test_invert_and_bootstrap_mapping():
    perm = [2, 0, 3, 1]
    inv = invert(perm)
    assert inv == [1, 3, 0, 2]
    assert [inv[v] for v in perm] == [0, 1, 2, 3]
    assert invert(inv) == perm
    with pytest.raises(ValueError):
        invert([0, 2])
    # bootstrap round trip: prompt position j shows original candidate perm[j]; a ranking
    # over prompt positions maps back to original candidates through perm.
    ranked_positions = [1, 3, 0, 2]
    assert [perm[j] for j in ranked_positions] == [0, 1, 2, 3]
