"""Retrievers (classical/retrievers.py) and the top-N protocol's pure parts (data/topn.py,
data/sampling.py), on hand-worked examples."""

import numpy as np
import pandas as pd
import pytest

from alro_ray.classical.retrievers import Retriever, RetrieverSpec, load_retriever, recall_at_n
from alro_ray.data.sampling import sample_users
from alro_ray.data.topn import fit_frames, mark_roles, topn_sample, user_windows


def frame(pairs):
    """(user, item) pairs in time order -> an interactions frame (rating 4, increasing timestamps)."""
    return pd.DataFrame({"user": [u for u, _ in pairs], "item": [i for _, i in pairs], "rating": 4.0,
                         "timestamp": np.arange(len(pairs))})


def test_ease_by_hand():
    # X: u1 {a, b}, u2 {a}; X'X + λI (λ = 1) = [[3, 1], [1, 2]], P = [[2, -1], [-1, 3]] / 5,
    # B_ij = -P_ij / P_jj: B_ab = 1/3, B_ba = 1/2, diagonal 0.
    ease = Retriever(RetrieverSpec("ease", reg=1.0), ["a", "b"]).fit(frame([("u1", "a"), ("u1", "b"), ("u2", "a")]))
    assert ease.scores([["a"], ["b"], []]) == pytest.approx(np.array([[0, 1 / 3], [1 / 2, 0], [0, 0]]))


def test_top_n_leaves_out_the_history_and_breaks_ties_by_catalogue_order():
    pop = Retriever(RetrieverSpec("popularity"), ["d", "c", "b", "a"]).fit(
        frame([("u1", "a"), ("u2", "a"), ("u1", "b"), ("u3", "c"), ("u3", "d")]))  # a 2, b c d 1
    ids, scores = pop.top_n([[], ["a"], ["a", "b", "c"]], 3)
    assert ids == [["a", "d", "c"], ["d", "c", "b"], ["d"]]  # ties: catalogue order d, c, b
    assert scores[0] == [2.0, 1.0, 1.0]
    assert pop.top_n([["zz"]], 2)[0] == [["a", "d"]]  # an item outside the catalogue is no history


def test_als_scores_users_from_their_history_alone():
    """Two taste groups: whoever rated {a, b} gets c (the group's third item) above x, y, z."""
    pairs = [(f"u{k}", i) for k in range(10) for i in ("a", "b", "c")] + [(f"v{k}", i) for k in range(10) for i in "xyz"]
    als = Retriever(RetrieverSpec("als", factors=4, reg=0.01, iterations=20), list("abcxyz")).fit(frame(pairs))
    ids, _ = als.top_n([["a", "b"], ["x", "y"]], 1)
    assert ids == [["c"], ["z"]]


def test_a_saved_retriever_scores_the_same(tmp_path):
    ease = Retriever(RetrieverSpec("ease", reg=2.0), list("abc")).fit(frame([("u", "a"), ("u", "b"), ("v", "c")]))
    back = load_retriever(ease.save(tmp_path / "r"))
    assert back.spec == ease.spec and back.items == ease.items
    assert np.array_equal(back.scores([["a"]]), ease.scores([["a"]]))
    with pytest.raises(ValueError, match="no saved retriever"):
        load_retriever(tmp_path)


def test_recall_at_n():
    assert recall_at_n([["a", "b"], ["c"], ["d"]], [["a", "x"], ["c"], []]) == pytest.approx((0.5 + 1) / 2)


# --- the protocol's windows and fits ------------------------------------------------------------


def user_log(n: int, user: str = "u") -> pd.DataFrame:
    return pd.DataFrame({"user": user, "item": [f"i{k}" for k in range(n)], "rating": 1.0 + np.arange(n) % 5,
                         "timestamp": np.arange(n) * 10})


def test_roles_and_windows_by_hand():
    # H 2, holdout 2: 9 ratings -> test = the last 2 (7, 8), valid = 5, 6, training windows end at 5:
    # window 0 positives 3, 4 (history 1, 2), window 1 positives 1, 2 would need 2 ratings before: no.
    m = mark_roles(pd.concat([user_log(9), user_log(4, "short")]), history=2, holdout=2, windows=3)
    u = m[m["user"] == "u"]
    assert u["role"].tolist() == ["train"] * 5 + ["valid"] * 2 + ["test"] * 2
    assert u["window"].tolist() == [-1, -1, -1, 0, 0, -1, -1, -1, -1]
    # 4 ratings < H + 2·holdout: no valid or test list; one training window (positives 2, 3)
    s = m[m["user"] == "short"]
    assert set(s["role"]) == {"train"} and s["window"].tolist() == [-1, -1, 0, 0]
    windows = user_windows(u, history=2, folds=3, seed=0)
    assert [(w["split"], w["window"]) for w in windows] == [("train", 0), ("valid", 0), ("test", 0)]
    test = windows[-1]
    assert test["seen"] == [f"i{k}" for k in range(7)] and test["history_items"] == ["i5", "i6"]
    assert test["target_items"] == ["i7", "i8"] and test["fit"] == "test"
    assert windows[0]["fit"].startswith("train-") and windows[0]["seen"] == ["i0", "i1", "i2"]


def test_no_fit_holds_the_positives_of_the_windows_it_serves():
    m = mark_roles(pd.concat([user_log(12, f"u{k}") for k in range(6)]), history=2, holdout=2, windows=2)
    fits = fit_frames(m, folds=3, seed=0)
    assert set(fits) == {"test", "valid", "train-0", "train-1", "train-2"}
    for user, g in m.groupby("user"):
        for w in user_windows(g, history=2, folds=3, seed=0):
            fit = fits[w["fit"]]
            held = set(zip(fit["user"], fit["item"]))
            assert not {(user, i) for i in w["target_items"]} & held, (user, w["split"], w["fit"])
    # ... while the test fit does hold the valid windows (the ratings before the test lists)
    assert len(fits["test"]) == len(m) - 6 * 2 and len(fits["valid"]) == len(m) - 6 * 4


def test_a_sample_marks_its_positives_and_orders_the_rest_by_the_retriever():
    w = {"user": "u", "split": "test", "window": 0, "history_items": ["h"], "history_ratings": [3.0],
         "target_items": ["p", "q"], "target_ratings": [5.0, 2.0], "target_timestamps": [10, 11]}
    row = topn_sample(w, ["x", "q", "y", "p"], [0.9, 0.8, 0.7, 0.1], permutations=0, seed=0)
    by_id = dict(zip(row["candidate_ids"], row["candidate_ratings"]))
    assert by_id == {"x": 0.0, "q": 2.0, "y": 0.0, "p": 5.0} and row["target_ratings"] == [5.0, 2.0]
    assert [row["candidate_ids"][j] for j in row["gold_order"]] == ["p", "q", "x", "y"]
    assert dict(zip(row["candidate_ids"], row["retriever_scores"])) == {"x": 0.9, "q": 0.8, "y": 0.7, "p": 0.1}
    assert row["perm_orders"] == []  # held-out rows get no permutations
    assert topn_sample({**w, "split": "train"}, ["x", "q", "y", "p"], [4, 3, 2, 1], permutations=2, seed=0)["perm_orders"]


# --- user sampling -------------------------------------------------------------------------------


def active_log():
    """200 users, user k with k + 1 ratings; two taste groups (even and odd users)."""
    rng = np.random.default_rng(0)
    rows = [(f"u{k:03d}", f"{'e' if k % 2 else 'o'}{rng.integers(0, 30)}") for k in range(200) for _ in range(k + 1)]
    return pd.DataFrame(rows, columns=["user", "item"])


def test_importance_sampling_favours_active_users_and_repeats():
    log = active_log()
    users, info = sample_users(log, "importance", 50, seed=0, penalty=0.1)
    assert len(users) == len(set(users)) == 50 and info["draws"] >= 50
    assert info["mean_activity"] > 1.2 * info["mean_activity_all"]
    assert sample_users(log, "importance", 50, seed=0, penalty=0.1)[0] == users  # seeded
    uniform, info = sample_users(log, "uniform", 50, seed=0)  # the reference at the same budget
    assert len(set(uniform)) == 50 and abs(info["mean_activity"] / info["mean_activity_all"] - 1) < 0.2
    assert uniform == sample_users(log, "uniform", 50, seed=0)[0] != sample_users(log, "uniform", 50, seed=1)[0]


def test_cluster_sampling_spreads_over_the_clusters():
    users, info = sample_users(active_log(), "cluster", 40, seed=0, clusters=4)
    assert len(users) == 40 and sum(info["picked_per_cluster"]) == 40
    # each cluster gives its share (40 / 4) or, when smaller, all it has (the rest is shared out)
    assert all(p == size or p >= 10 for p, size in zip(info["picked_per_cluster"], info["cluster_sizes"]))
    assert sample_users(active_log(), "all", 0, seed=0)[1] == {"method": "all", "users": 200, "of": 200}
