"""Prompt hints (`data.hints`, alro_ray/data/hints.py): hand-computed values, rendering, and the
cross-fit's guarantees: no held-out candidate window reaches any hint, and no training window
reaches a training row's hint."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from alro_ray.config import load_config
from alro_ray.data.hints import (HintModel, RowHints, cross_fit, fit_hints, hint_interactions, render_hint,
                                render_hints, train_folds)
from alro_ray.data.prompts import SampleRenderer

NAMES = ["item_mean", "popularity_rank", "mf_score"]


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def test_render_hint_exact_text():
    v = {"mean_rating": 4.14, "ratings": 52, "popularity_rank": 17, "mf_score": 3.87}
    assert render_hint(v, NAMES) == "mean rating: 4.1 (52 ratings) popularity rank: 17 predicted rating: 3.9"
    assert render_hint({**v, "ratings": 1}, ["item_mean"]) == "mean rating: 4.1 (1 rating)"
    assert render_hint(None, NAMES) == "mean rating: none popularity rank: none predicted rating: none"
    assert render_hint(v, ["popularity_rank"]) == "popularity rank: 17"  # only what is configured


def test_mf_rank_places_each_candidate_in_its_own_list():
    values = [{"mf_score": 3.1}, None, {"mf_score": 4.0}, {"mf_score": 3.1}, {"mean_rating": 4.0}]
    assert render_hints(values, ["mf_rank"]) == ["MF rank: 2", "MF rank: none", "MF rank: 1", "MF rank: 3",
                                                 "MF rank: none"]  # ties by list order; no score: none
    assert render_hints(values[:1], ["mf_score", "mf_rank"]) == ["predicted rating: 3.1 MF rank: 1"]
    assert values[0] == {"mf_score": 3.1}  # the caller's values are left as they were


def test_item_mean_and_popularity_rank_by_hand():
    # a: 5, 4; b: 3; c: 1, 2, 3; d: 4, 4.  mu = 26 / 8 = 3.25; shrunk (sum + 5 mu) / (n + 5).
    fit = _frame([("u1", "a", 5, 1), ("u2", "a", 4, 1), ("u1", "b", 3, 2), ("u1", "c", 1, 3),
                  ("u2", "c", 2, 2), ("u3", "c", 3, 1), ("u3", "d", 4, 2), ("u2", "d", 4, 3)])
    m = fit_hints(fit, ["item_mean", "popularity_rank"])
    v = dict(zip(m.items, m.values(m.items)))
    assert v["a"]["mean_rating"] == pytest.approx((9 + 5 * 3.25) / 7)
    assert v["b"]["mean_rating"] == pytest.approx((3 + 5 * 3.25) / 6)
    assert [v[i]["ratings"] for i in "abcd"] == [2, 1, 3, 2]
    assert [v[i]["popularity_rank"] for i in "abcd"] == [2, 4, 1, 2]  # ties share the better rank
    assert "mf_score" not in v["a"]
    assert m.values(["never-seen"]) == [None]


def _mf_model() -> HintModel:
    # One factor: q_x = 1, q_y = -1, no item biases, mu = 3, L2 0.1.
    return HintModel(["mf_score"], ["x", "y"], np.array([3.0, 3.0]), np.array([1, 1]), np.array([1, 1]),
                     np.zeros(2), np.array([[1.0], [-1.0]]), mf_mu=3.0, mf_reg=0.1)


def test_mf_score_solves_the_user_from_the_shown_history():
    # History: x rated 5. Ridge on [q_x, 1] w = 5 - 3 with L2 0.1 * 1 rating:
    # [[1.1, 1], [1, 1.1]] w = [2, 2]  ->  p = b_u = 2 / 2.1.
    w = 2 / 2.1
    got = _mf_model().values(["x", "y", "z"], ["x"], [5.0])
    assert got[0]["mf_score"] == pytest.approx(3 + w + w)
    assert got[1]["mf_score"] == pytest.approx(3 + w - w)
    assert got[2] is None
    # An unknown history (or none): the item's own score, mu + b_i.
    assert _mf_model().values(["x"], ["q"], [1.0])[0]["mf_score"] == pytest.approx(3.0)


def test_row_hints_take_the_fold_by_split_and_the_user_part_from_all_their_ratings():
    train = _mf_model()
    held_out = HintModel(["mf_score"], ["x", "y"], np.array([3.0, 3.0]), np.array([1, 1]), np.array([1, 1]),
                         np.zeros(2), np.array([[1.0], [-1.0]]), mf_mu=2.0, mf_reg=0.1)  # mu 2, not 3
    fit = _frame([("u", "x", 5.0, 1), ("u", "y", 1.0, 2)])
    hints = RowHints(held_out, fit, [train], [fit], {"u": 0})
    row = {"user": "u", "split": "test", "candidate_ids": ["x"], "history_items": ["q"], "history_ratings": [1.0]}
    # Both ratings in the fold, not the shown (unknown) history. Rows [q_i, 1]: x [1, 1], y [-1, 1];
    # X^T X + 0.1 * 2 I = [[2.2, 0], [0, 2.2]]. Held-out fold (mu 2): targets 3, -1, X^T y = [4, 2],
    # so p = 4 / 2.2, b_u = 2 / 2.2 and x scores 2 + 6 / 2.2.
    assert hints.notes(row) == [f"predicted rating: {2 + 6 / 2.2:.1f}"]
    # A training row, the training fold (mu 3): targets 2, -2, X^T y = [4, 0], x scores 3 + 4 / 2.2.
    assert hints.notes({**row, "split": "train"}) == [f"predicted rating: {3 + 4 / 2.2:.1f}"]
    # A user the fold does not hold: the shown history (here unknown: mu + b_i).
    assert hints.notes({**row, "user": "other"}) == ["predicted rating: 2.0"]


def test_train_folds_deal_the_users_evenly_and_repeatably():
    users = [f"u{i}" for i in range(11)] * 3  # a user with several windows is dealt once
    folds = train_folds(users, 4, seed=0)
    assert sorted(folds) == sorted(set(users)) and sorted(set(folds.values())) == [0, 1, 2, 3]
    assert sorted(list(folds.values()).count(k) for k in range(4)) == [2, 3, 3, 3]
    assert train_folds(list(reversed(users)), 4, seed=0) == folds  # by user, not by row order
    assert train_folds(users, 4, seed=1) != folds
    assert set(train_folds(users, 1).values()) == {0}


def test_cross_fit_shows_each_training_row_the_fit_without_its_own_folds_windows():
    # Users 0-3 rated h 3 before their window and x (their one candidate) 1, 2, 3, 5: any two
    # users' sum differs from the other two's, so each fold's fit shows x a mean of its own.
    r = {"u0": 1, "u1": 2, "u2": 3, "u3": 5}
    fit = _frame([(u, "h", 3, 1) for u in r] + [(u, "x", v, 2) for u, v in r.items()])
    windows = pd.DataFrame({"user": list(r), "candidate_ids": [["x"]] * 4})
    row = {"candidate_ids": ["x"], "history_items": ["h"], "history_ratings": [3.0]}

    def shown(hints, user, split="train"):
        return hints.notes({**row, "user": user, "split": split})

    one = cross_fit(fit, windows, ["item_mean"], folds=1)
    assert [shown(one, u) for u in r] == [["mean rating: none"]] * 4  # no training window in the fit
    assert one.fit_sizes == [4]

    two = cross_fit(fit, windows, ["item_mean"], folds=2)
    assert two.fit_sizes == [6, 6]  # each fold's fit keeps the other fold's two windows
    for u in r:
        others = [v for w, v in r.items() if two.fold_of[w] != two.fold_of[u]]
        mu = (4 * 3 + sum(others)) / 6
        assert shown(two, u) == [f"mean rating: {(sum(others) + 5 * mu) / 7:.1f} (2 ratings)"]
    assert len({shown(two, u)[0] for u in r}) == 2
    mu = (12 + 11) / 8  # held-out rows: every training window
    assert shown(two, "u0", "test") == [f"mean rating: {(11 + 5 * mu) / 9:.1f} (4 ratings)"]


def test_hint_interactions_drop_every_window_and_nothing_else():
    fit = _frame([("u1", "a", 5, 1), ("u1", "b", 1, 2), ("u2", "a", 4, 1), ("u2", "b", 2, 2)])
    windows = pd.DataFrame({"user": ["u1"], "candidate_ids": [np.array(["b", "zz"])]})
    kept = hint_interactions(fit, windows)
    assert list(zip(kept["user"], kept["item"])) == [("u1", "a"), ("u2", "a"), ("u2", "b")]


def test_save_load_round_trip(tmp_path):
    fit = _frame([("u1", "a", 5, 1), ("u2", "a", 4, 1), ("u1", "b", 3, 2), ("u2", "c", 2, 2)])
    m = fit_hints(fit, NAMES)
    m.save(tmp_path / "h.parquet")
    back = HintModel.load(tmp_path / "h.parquet")
    row = {"candidate_ids": ["a", "b", "c", "d"], "history_items": ["a"], "history_ratings": [5.0]}
    assert back.names == NAMES and back.notes(row) == m.notes(row)
    assert back.notes(row)[3] == "mean rating: none popularity rank: none predicted rating: none"


def test_suffix_with_and_without_hints():
    items = {"x": ("Alien", "Horror"), "y": ("Babe", "Comedy")}
    row = {"candidate_ids": ["x", "y"], "history_items": [], "history_ratings": []}
    plain = SampleRenderer(items, "genres", "movies")
    assert plain.suffix(row) == "(A) title: Alien genres: Horror\n(B) title: Babe genres: Comedy\n### Response:\n"
    m = HintModel(["item_mean"], ["x"], np.array([4.25]), np.array([5]), np.array([1]), np.zeros(1),
                  np.zeros((1, 0)))
    hinted = SampleRenderer(items, "genres", "movies", m)
    assert hinted.suffix(row, [1, 0]) == ("(A) title: Babe genres: Comedy mean rating: none\n"
                                          "(B) title: Alien genres: Horror mean rating: 4.2 (5 ratings)\n"
                                          "### Response:\n")
    assert hinted.prefix({**row, "history_items": ["x"], "history_ratings": [5.0]}) == \
        plain.prefix({**row, "history_items": ["x"], "history_ratings": [5.0]})  # history unchanged


# ---------------------------------------------------------------------------------------------
# Through `alro prepare`: planted candidate ratings that would move the hints if they leaked.

USERS = 10


def _planted_rows():
    """Users 0-4: history y=3, x=5; candidates z=1, v<u>=3. Users 5-9: history y=2, z=4;
    candidates x=1, w<u>=2. x and z are rated 5 / 4 in histories and 1 in candidate windows
    (of training and held-out users alike), so a leak would pull their means down."""
    rows = []
    for u in range(USERS):
        seq = ([("y", 3), ("x", 5), ("z", 1), (f"v{u}", 3)] if u < 5
               else [("y", 2), ("z", 4), ("x", 1), (f"w{u}", 2)])
        rows += [(f"u{u}", i, float(r), 100 * u + t) for t, (i, r) in enumerate(seq)]
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_local):
    from ray.data import DataContext

    from alro_ray.data.prepare import prepare

    d = tmp_path_factory.mktemp("hints-table")
    rows = _planted_rows()
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(d / "interactions.csv",
                                                                                    index=False)
    items = sorted({i for _, i, _, _ in rows})
    pd.DataFrame({"item_id": items, "title": [f"Film {i}" for i in items]}).to_csv(d / "items.csv", index=False)
    out = tmp_path_factory.mktemp("hints-out")
    ctx = DataContext.get_current()
    old, ctx.default_hash_shuffle_parallelism = ctx.default_hash_shuffle_parallelism, 4
    try:
        cfg = load_config(None, ["data.dataset=table", f"data.data_dir={d}", "data.history=2",
                                 "data.candidates=2", "data.hints=[item_mean, popularity_rank, mf_score, mf_rank]"])
        stats = prepare(cfg, out)
    finally:
        ctx.default_hash_shuffle_parallelism = old
    return out, stats


def _splits(out) -> dict[str, str]:
    return {r["user"]: s for s in ("train", "valid", "test") for r in pq.read_table(out / s).to_pylist()}


def test_prepare_cross_fits_the_hints(planted):
    out, stats = planted
    splits = _splits(out)
    trained = {int(u[1:]) for u, s in splits.items() if s == "train"}
    a, b = len(trained & set(range(5))), len(trained & set(range(5, USERS)))
    assert 0 < len(trained) < USERS and stats.hints == NAMES + ["mf_rank"] and stats.hint_tokens_per_prompt > 0

    # Training rows' fold: no training window, and held-out windows are never in the fit: the
    # histories only. y=3 x5, x=5 x5, y=2 x5, z=4 x5: mu = 70 / 20 = 3.5.
    assert stats.hint_train_interactions == 2 * USERS and stats.hint_folds == 1
    assert sorted(p.name for p in out.glob("hints*.parquet")) == ["hints.parquet", "hints_train-0.parquet"]
    m = HintModel.load(out / "hints_train-0.parquet")
    v = dict(zip(m.items, m.values(m.items)))
    assert sorted(v) == ["x", "y", "z"]  # v<u>, w<u> only ever were candidates
    assert v["x"]["mean_rating"] == pytest.approx((25 + 5 * 3.5) / 10)  # 4.25, not pulled to 1
    assert v["z"]["mean_rating"] == pytest.approx((20 + 5 * 3.5) / 10)
    assert [v[i]["ratings"] for i in "xyz"] == [5, 10, 5]
    assert [v[i]["popularity_rank"] for i in "xyz"] == [2, 1, 2]

    # Held-out rows' fold: the histories and the training users' windows (users 0-4: z=1, v<u>=3;
    # users 5-9: x=1, w<u>=2), never a held-out user's window.
    fit = pq.read_table(out / "fit_interactions.parquet").to_pandas()
    assert stats.hint_interactions == len(fit) == 2 * USERS + 2 * len(trained)
    m = HintModel.load(out / "hints.parquet")
    v = dict(zip(m.items, m.values(m.items)))
    assert sorted(v) == sorted(["x", "y", "z"] + [f"{'v' if u < 5 else 'w'}{u}" for u in trained])
    mu = (70 + 4 * a + 3 * b) / (20 + 2 * len(trained))
    assert v["x"]["mean_rating"] == pytest.approx((25 + b + 5 * mu) / (10 + b))
    assert v["z"]["mean_rating"] == pytest.approx((20 + a + 5 * mu) / (10 + a))
    assert [v[i]["ratings"] for i in "xyz"] == [5 + b, 10, 5 + a]


def test_prompts_show_their_fold_and_re_render_identically(planted):
    from alro_ray.data.dataset import load_renderer

    out, _ = planted
    renderer = load_renderer(out)
    held_out = HintModel.load(out / "hints.parquet")
    x = held_out.values(["x"])[0]
    rows = [r for s in ("train", "valid", "test") for r in pq.read_table(out / s).to_pylist()]
    assert len(rows) == USERS
    for r in rows:
        assert renderer.prefix(r) + renderer.suffix(r) == r["prompt"]  # evaluation re-renders these
        lines = [ln for ln in r["prompt"].splitlines() if ln.startswith("(")]
        for cid, line, note in zip(r["candidate_ids"], lines, r["candidate_notes"]):
            assert line.endswith(note)
            if cid == "x" and r["split"] == "train":
                assert "mean rating: 4.2 (5 ratings) popularity rank: 2 predicted rating: " in line
            elif cid == "x":
                assert f"mean rating: {x['mean_rating']:.1f} ({x['ratings']} ratings)" in line
            if cid.startswith(("v", "w")):  # in no fold a row of its user sees
                assert line.endswith("mean rating: none popularity rank: none predicted rating: none MF rank: none")
            else:
                assert line.endswith("MF rank: 1")
    history = [ln for r in rows for ln in r["prompt"].splitlines() if ln.startswith("title:")]
    assert history and not any("mean rating" in ln for ln in history)


def test_ranker_hint_notes_prefer_request_values_then_the_saved_fit():
    from alro_ray.rank.ranker import Ranker

    m = HintModel(["item_mean", "popularity_rank"], ["x"], np.array([4.25]), np.array([5]), np.array([2]),
                  np.zeros(1), np.zeros((1, 0)))
    ranker = Ranker(None, None, None, {}, None, None, m)
    given = [None, {"mean_rating": 3.04, "ratings": 7}, None]
    assert ranker.hint_notes(["x", "q", "unknown"], given) == [
        "mean rating: 4.2 (5 ratings) popularity rank: 2",     # from the checkpoint's fit
        "mean rating: 3.0 (7 ratings) popularity rank: none",  # as the request gave it
        "mean rating: none popularity rank: none"]             # unknown id, nothing given
    assert Ranker(None, None, None, {}, None).hint_notes(["x"]) is None  # no hints: spec prompts


def test_ranker_mf_rank_places_request_and_fitted_scores_in_one_list():
    from alro_ray.rank.ranker import Ranker

    m = _mf_model()
    m.names = ["mf_rank"]
    ranker = Ranker(None, None, None, {}, None, None, m)
    # x: 3 + 2 * 2 / 2.1 = 4.9 and y: 3.0 from the fit (history x rated 5), q: 3.5 as the request gave it.
    assert ranker.hint_notes(["x", "y", "q"], [None, None, {"mf_score": 3.5}], ["x"], [5.0]) == [
        "MF rank: 1", "MF rank: 3", "MF rank: 2"]
