"""Classical baselines on small planted data: hand-worked orders for the counting baselines, planted
structure that the learned ones must find."""

import numpy as np
import pandas as pd
import pytest
import torch

from alro_ray.classical.registry import BASELINES, baseline_orders, make_baseline, order_from_scores
from alro_ray.evaluate.baselines import evaluate_baselines
from alro_ray.rank.metrics import mean_ndcg


def interactions(triples, start=0):
    """(user, item, rating) in time order -> a fit frame; timestamps increase along the list."""
    users, items, ratings = zip(*triples)
    return pd.DataFrame({"user": [str(u) for u in users], "item": [str(i) for i in items],
                         "rating": np.asarray(ratings, dtype=float),
                         "timestamp": np.arange(start, start + len(triples)), "split": "train"})


def row(user, candidates, ratings=None, history=()):
    return {"user": str(user), "window": 0, "history_items": [str(h) for h in history],
            "history_ratings": [4.0] * len(history), "candidate_ids": [str(c) for c in candidates],
            "candidate_ratings": list(ratings if ratings is not None else [1.0] * len(candidates))}


def ndcg10(baseline, rows):
    orders = baseline_orders(baseline, rows)
    return mean_ndcg([[r["candidate_ratings"][j] for j in o] for r, o in zip(rows, orders)], ks=(10,))["ndcg@10"]


# --- counting baselines, worked by hand ----------------------------------------------------------

# a: 5 5 5   d: 5   b: 1 1 1 1   c: 3   -> 9 ratings summing to 27, global mean 3.
COUNTED = interactions([("u1", "a", 5), ("u2", "a", 5), ("u3", "a", 5), ("u1", "d", 5),
                        ("u1", "b", 1), ("u2", "b", 1), ("u3", "b", 1), ("u4", "b", 1), ("u4", "c", 3)])
# Prompt order d, b, z (never seen), c, a.
COUNTED_ROW = row("u9", ["d", "b", "z", "c", "a"])


def test_popularity_worked_example():
    pop = make_baseline("popularity").fit(COUNTED)
    # counts d 1, b 4, z 0, c 1, a 3 -> b, a, then d and c tie at 1 (prompt order: d first), z
    assert pop.score(COUNTED_ROW).tolist() == [1, 4, 0, 1, 3]
    assert baseline_orders(pop, [COUNTED_ROW]) == [[1, 4, 0, 3, 2]]


@pytest.mark.parametrize("k, scores, order", [
    # k=1: a (15+3)/4 = 4.5, d (5+3)/2 = 4, b (4+3)/5 = 1.4, c (3+3)/2 = 3, z: global mean 3
    (1, [4.0, 1.4, 3.0, 3.0, 4.5], [4, 0, 2, 3, 1]),
    # k=5 (default): a 30/8 = 3.75, d 20/6, b 19/9, c 18/6 = 3, z 3
    (None, [20 / 6, 19 / 9, 3.0, 3.0, 3.75], [4, 0, 2, 3, 1]),
    # k=0, raw means: a and d tie at 5, so d (earlier in the prompt) comes first
    (0, [5.0, 1.0, 3.0, 3.0, 5.0], [0, 4, 2, 3, 1]),
])
def test_item_mean_worked_example(k, scores, order):
    model = make_baseline("item-mean", **({} if k is None else {"k": k})).fit(COUNTED)
    assert model.score(COUNTED_ROW) == pytest.approx(scores)
    assert baseline_orders(model, pd.DataFrame([COUNTED_ROW])) == [order]


def test_ties_keep_prompt_order():
    assert order_from_scores([0.0, 0.0, 0.0]) == [0, 1, 2]
    assert order_from_scores([1.0, 2.0, 2.0, 1.0]) == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="finite"):
        order_from_scores([0.0, np.nan])


def test_random_is_seeded_per_user_and_independent_of_row_order():
    rows = [row(u, range(20)) for u in range(30)]
    a = baseline_orders(make_baseline("random", seed=0).fit(COUNTED), rows)
    assert a == baseline_orders(make_baseline("random", seed=0), rows)
    assert a[::-1] == baseline_orders(make_baseline("random", seed=0), rows[::-1])
    b = baseline_orders(make_baseline("random", seed=1), rows)
    assert sum(x != y for x, y in zip(a, b)) >= 29           # another seed, other orders
    assert len({tuple(o) for o in a}) == 30                     # users differ from each other
    assert sorted(a[0]) == list(range(20))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown baseline 'bpr'.*item-mean.*sasrec"):
        make_baseline("bpr")
    assert set(BASELINES) == {"random", "popularity", "item-mean", "mf", "gru4rec", "sasrec", "item-knn", "retriever"}


# --- matrix factorization: two user groups with opposite tastes ----------------------------------


def taste_data(seed=0):
    """Group 0 rates items 0-9 with 5 and 10-19 with 1, group 1 the reverse. Every item is rated
    5 and 1 equally often overall, so the item means carry no signal. Test users show 10 random
    items in the fit data; the other 10 are their candidates, absent from the fit data."""
    rng = np.random.default_rng(seed)
    like = lambda u, i: 5.0 if (i < 10) == (u % 2 == 0) else 1.0  # noqa: E731
    fit = [(f"t{u}", i, like(u, i)) for u in range(40) for i in rng.permutation(20)]
    rows = []
    for u in range(20):
        items = rng.permutation(20)
        fit += [(f"q{u}", i, like(u, i)) for i in items[:10]]
        cands = items[10:]
        rows.append(row(f"q{u}", cands, [like(u, i) for i in cands]))
    return interactions(fit), rows


MF_KW = {"epochs": 10, "batch_size": 512, "lr": 0.1, "reg": 0.01}


def test_mf_learns_planted_tastes_that_item_mean_cannot():
    fit, rows = taste_data()
    mf = make_baseline("mf", seed=0, **MF_KW).fit(fit)
    item_mean = make_baseline("item-mean").fit(fit)
    assert ndcg10(mf, rows) > 0.95
    assert ndcg10(mf, rows) > ndcg10(item_mean, rows) + 0.2


def test_mf_is_seeded_and_leaves_the_callers_rng_alone():
    fit, rows = taste_data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = make_baseline("mf", seed=0, epochs=2).fit(fit).score(rows[0])
    assert torch.equal(before, torch.get_rng_state())
    assert np.array_equal(a, make_baseline("mf", seed=0, epochs=2).fit(fit).score(rows[0]))
    assert not np.array_equal(a, make_baseline("mf", seed=1, epochs=2).fit(fit).score(rows[0]))


# --- sequential models: item i is always followed by item i+1 (mod 30) ---------------------------

N_ITEMS, SEQ_LEN = 30, 14
SEQ_KW = {"dim": 32, "max_len": 16, "epochs": 20, "lr": 2e-2, "batch_size": 160, "negatives": None}


def make_chain_data():
    """160 users walking the chain from random starts; the last 30 are test users."""
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": (rng.integers(N_ITEMS) + np.arange(SEQ_LEN)) % N_ITEMS for u in range(160)}
    fit, rows = [], []
    for u, seq in seqs.items():
        test_user = int(u[1:]) >= 130
        # test users: the last item is their held-out next item, not in the fit data
        fit += [(u, i, 4.0) for i in (seq[:-1] if test_user else seq)]
        if test_user:
            others = rng.choice([i for i in range(N_ITEMS) if i != seq[-1]], 9, replace=False)
            cands = rng.permutation(np.append(others, seq[-1]))
            rows.append(row(u, cands, [5.0 if c == seq[-1] else 1.0 for c in cands], history=seq[-11:-1]))
    return interactions(fit), rows, seqs


@pytest.fixture(scope="module")
def chain_data():
    return make_chain_data()


@pytest.fixture(scope="module", params=["gru4rec", "sasrec"])
def chain_model(request, chain_data):
    return make_baseline(request.param, seed=0, **SEQ_KW).fit(chain_data[0])


def test_sequential_models_learn_the_planted_successor(chain_model, chain_data):
    _, rows, _ = chain_data
    firsts = [r["candidate_ratings"][o[0]] == 5.0 for r, o in zip(rows, baseline_orders(chain_model, rows))]
    assert np.mean(firsts) >= 0.8   # chance: 0.1


def test_sequential_context_stops_at_the_rows_history(chain_model, chain_data):
    """A training user's fit sequence runs past a row's window: only what precedes it counts.
    A user absent from the fit data is read from the row's history."""
    _, _, seqs = chain_data
    seq = seqs["u0"]                                           # fully in the fit data
    cands = [(seq[6] + 1) % N_ITEMS, (seq[-1] + 1) % N_ITEMS]  # next after item 6 / after the end
    scores = chain_model.score(row("u0", cands, history=seq[2:7]))
    assert scores[0] > scores[1]
    ghost = row("nobody", [(seq[-1] + 1) % N_ITEMS, seq[3]], history=seq[-6:])
    assert np.argmax(chain_model.score(ghost)) == 0


# --- what the fit data need not hold -------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "retriever"])  # it reads no fit: below
def test_candidates_and_users_unseen_at_fit_time_score(name):
    fit = interactions([(u, i, 1 + (u + i) % 5) for u in range(6) for i in range(8)])
    kw = {"epochs": 1} if name in ("mf", "gru4rec", "sasrec") else {}
    model = make_baseline(name, seed=0, **kw).fit(fit)
    for r in (row("0", ["x", "y", "3", "z"], history=[1, 2]), row("new", ["x", "y"], history=["w"])):
        s = model.score(r)
        assert s.shape == (len(r["candidate_ids"]),) and np.all(np.isfinite(s))


def test_the_retriever_order_is_the_rows_own_scores():
    model = make_baseline("retriever").fit(interactions([(0, 1, 5)]))
    assert baseline_orders(model, [{"candidate_ids": ["a", "b", "c"], "retriever_scores": [0.2, 0.9, 0.2]}]) == [[1, 0, 2]]
    with pytest.raises(ValueError, match="top-N protocol"):
        model.score({"candidate_ids": ["a", "b"], "retriever_scores": []})


def test_evaluate_baselines_on_a_prepared_directory(tmp_path):
    fit, rows = taste_data()
    fit.to_parquet(tmp_path / "fit_interactions.parquet")
    (tmp_path / "test").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "test" / "part-00000.parquet")
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baselines(tmp_path, names=["popularity", "dien"])
    out = evaluate_baselines(tmp_path, names=["random", "item-mean", "mf"],
                             options={"mf": MF_KW})
    assert set(out) == {"random", "item-mean", "mf"}
    for m in out.values():
        assert {"ndcg@3", "ndcg@10", "ndcg@25", "fit_seconds", "tpq_seconds"} <= set(m)
        assert 0 < m["ndcg@10"] <= 1 and m["fit_seconds"] >= 0 and m["lists"] == 20
    assert out["mf"]["ndcg@10"] > out["item-mean"]["ndcg@10"] + 0.2


def test_item_knn_by_hand():
    """Users: a-b twice, a-c once, d alone. cos(b, a) = 2 / sqrt(2 * 3), cos(c, a) = 1 / sqrt(1 * 3),
    d shares no user with a; only the `recent` latest history items count."""
    fit = pd.DataFrame({"user": ["1", "1", "2", "2", "3", "3", "4"], "item": ["a", "b", "a", "b", "a", "c", "d"],
                        "rating": 4.0, "timestamp": range(7)})
    knn = make_baseline("item-knn", recent=1).fit(fit)
    scores = knn.score({"candidate_ids": ["b", "c", "d", "new"], "history_items": ["d", "a"]})
    assert scores == pytest.approx([2 / np.sqrt(6), 1 / np.sqrt(3), 0.0, 0.0])
