"""evaluate/results.py: the comparison's files, names, same-lists check and intervals on a worked example."""

import json

import pandas as pd
import pytest

from alro_ray.errors import AlroError
from alro_ray.evaluate.results import (MethodResult, ndcg_from_predictions, ranker_results, read_predictions,
                                   read_results, write_results)

RATINGS = {"u1": {"a": 5.0, "b": 3.0, "c": 1.0}, "u2": {"a": 1.0, "b": 4.0, "c": 2.0}}


def _method(orders: dict[str, list[str]], **info) -> MethodResult:
    return MethodResult(orders, {u: [RATINGS[u][i] for i in o] for u, o in orders.items()}, info)


def test_files_hold_every_method_on_the_same_users(tmp_path):
    perfect = {"u1": ["a", "b", "c"], "u2": ["b", "c", "a"]}
    worst = {"u1": ["c", "b", "a"], "u2": ["a", "c", "b"]}
    results = {"item-mean": _method(worst), "mf": _method(worst), "llm-score": _method(perfect, train_samples=8),
               "fused-score-mf": _method(perfect, fusion={"weight": 0.7})}
    table = write_results(tmp_path, results, "header")
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert rows["llm-score"] == {"ndcg@3": 1.0, "ndcg@10": 1.0, "ndcg@25": 1.0}
    # u1 reversed: gains 1, 7, 31 -> (1 + 7/log2 3 + 31/2) / (31 + 7/log2 3 + 1/2) = 0.58236;
    # u2 reversed: gains 1, 3, 15 -> (1 + 3/log2 3 + 15/2) / (15 + 3/log2 3 + 1/2) = 0.59754
    assert rows["mf"]["ndcg@3"] == pytest.approx((0.58236 + 0.59754) / 2, abs=1e-5)
    assert table["mf"]["lists"] == 2
    frame = read_predictions(tmp_path / "predictions.parquet")
    assert sorted(frame.columns) == ["method", "ranking", "ratings", "targets", "user"] and len(frame) == 8
    assert list(frame[(frame.method == "llm-score") & (frame.user == "u2")]["ranking"].iloc[0]) == ["b", "c", "a"]
    assert ndcg_from_predictions(frame)["mf"] == pytest.approx(rows["mf"]["ndcg@10"])
    gaps = json.loads((tmp_path / "details.json").read_text())["intervals"]
    best = {g["reference"]: g for g in gaps if g["best"]}
    assert best["item-mean"]["method"] == "llm-score" and best["mf"]["method"] == "fused-score-mf"
    assert best["mf"]["ndcg@10_diff"] == pytest.approx(1 - table["mf"]["ndcg@10"])
    md = (tmp_path / "compare.md").read_text()
    assert "| llm-score |" in md and "**best** fused-score-mf - mf" in md and "| 0.7 |" in md


def test_written_results_read_back_for_merging(tmp_path):
    """`alro compare --merge DIR` reads an earlier table's rows back: rankings, ratings and the
    per-row facts, not the metrics (recomputed on the merged table's lists)."""
    rows = {"mf": _method({"u1": ["c", "b", "a"], "u2": ["b", "a", "c"]}),
            "llm-sft-generate": _method({"u1": ["a", "b", "c"], "u2": ["a", "b", "c"]}, train_samples=8)}
    write_results(tmp_path, rows, "header")
    back = read_results(tmp_path)
    assert list(back) == ["mf", "llm-sft-generate"]
    assert back["llm-sft-generate"].rankings == rows["llm-sft-generate"].rankings
    assert back["mf"].ratings == rows["mf"].ratings
    assert back["llm-sft-generate"].info == {"train_samples": 8}
    with pytest.raises(AlroError, match="holds no `alro compare` results"):
        read_results(tmp_path / "nothing")


def test_stability_columns_of_the_llm_rows(tmp_path):
    """`--reorders p`: an llm- row carries its mode's first-shown rank and stability across
    candidate orders into details.json and compare.md; classical and fused rows show '-'."""
    order = {"u1": ["a", "b", "c"], "u2": ["b", "c", "a"]}
    stable = {"first_shown_mean_rank": 1.25, "stability_tau": 0.375, "ndcg@10_spread": 0.0625, "reorders": 3}
    rows = {"mf": _method(order), "llm-alro-generate": _method(order, **stable),
            "fused-alro-generate-mf": _method(order, first_shown_mean_rank=2.0)}
    table = write_results(tmp_path, rows, "header")
    assert {k: table["llm-alro-generate"][k] for k in stable} == stable
    md = (tmp_path / "compare.md").read_text()
    assert "| first-shown rank | τ across reorders | NDCG@10 spread |" in md
    assert "| 1.25 | 0.375 | 0.0625 |" in md and "| 2.00 | - | - |" in md and "under p = 3 seeded reorders" in md
    assert "Measured on the llm- rows only" in md
    assert read_results(tmp_path)["llm-alro-generate"].info == stable  # kept when merged
    write_results(tmp_path, {"mf": _method(order), "llm-x": _method(order, first_shown_mean_rank=1.5)}, "header")
    assert "τ across reorders" not in (tmp_path / "compare.md").read_text()  # no --reorders: no columns


def test_methods_on_other_users_are_refused(tmp_path):
    results = {"mf": _method({"u1": ["a", "b", "c"]}), "llm-x": _method({"u2": ["a", "b", "c"]})}
    with pytest.raises(AlroError, match="ranked other users"):
        write_results(tmp_path, results, "")


def test_ranker_rows_are_named_by_variant_mode_and_baseline():
    preds = pd.DataFrame([
        {"user": "u1", "mode": "generate", "predicted_ids": ["a", "b", "c"], "predicted_ratings": [5.0, 3.0, 1.0]},
        {"user": "u1", "mode": "fused-generate-mf", "predicted_ids": ["a", "c", "b"], "predicted_ratings": [5.0, 1.0, 3.0]},
    ])
    fusion = {"fused-generate-mf": {"mode": "generate", "baseline": "mf", "method": "score", "weight": 0.3,
                                    "valid_ndcg@10": 0.9, "valid_lists": 5}}
    modes = {"generate": {"tpq_seconds": 1.5, "ndcg@10": 0.5, "first_shown_mean_rank": 2.5, "stability_tau": 0.8},
             "fused-generate-mf": {"tpq_seconds": 1.5, "first_shown_mean_rank": 3.0}}
    out = ranker_results(preds, "alro", modes, fusion, {"train_samples": 4})
    assert set(out) == {"llm-alro-generate", "fused-alro-generate-mf"}
    assert out["fused-alro-generate-mf"].info["fusion"]["weight"] == 0.3
    assert out["fused-alro-generate-mf"].info["first_shown_mean_rank"] == 3.0  # its own, and no stability
    assert "stability_tau" not in out["fused-alro-generate-mf"].info
    assert out["llm-alro-generate"].info == {"tpq_seconds": 1.5, "train_samples": 4, "first_shown_mean_rank": 2.5,
                                             "stability_tau": 0.8}
    score = ranker_results(preds.assign(mode="score"), "score", {"score": {"tpq_seconds": 0.1}}, {})
    assert set(score) == {"llm-score"}


def test_top_n_tables_are_end_to_end_and_held_against_the_retriever(tmp_path):
    """Under topn a list is scored against its whole held-out set (`targets`), the best llm- row
    is held against `retriever`, the best fused- row against the best classical row."""
    def topn(orders, info=None):
        ratings = {"u1": {"a": 5.0, "b": 0.0, "c": 0.0}, "u2": {"a": 0.0, "b": 0.0, "c": 0.0}}
        return MethodResult(orders, {u: [ratings[u][i] for i in o] for u, o in orders.items()}, info or {},
                            {"u1": [5.0, 4.0], "u2": [3.0]})  # u1 held out two items, one retrieved; u2 one, missed
    first = {"u1": ["a", "b", "c"], "u2": ["a", "b", "c"]}
    last = {"u1": ["b", "c", "a"], "u2": ["a", "b", "c"]}
    results = {"retriever": topn(last), "popularity": topn(first), "llm-x": topn(first), "fused-x-popularity": topn(first)}
    table = write_results(tmp_path, results, "header", "topn", ["retriever", "popularity"])
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert set(rows["llm-x"]) == {"ndcg@5", "ndcg@10", "ndcg@20", "recall@10", "hr@10", "mrr", "ndcg_within@10"}
    # u1: gain 31 at rank 1 against the ideal 31 + 15/log2 3; u2: nothing retrieved, 0 (counted).
    assert rows["llm-x"]["ndcg@10"] == pytest.approx(31 / (31 + 15 / 1.5849625) / 2, abs=1e-6)
    assert rows["llm-x"]["ndcg_within@10"] == 1.0 and table["llm-x"]["lists"] == 2
    assert rows["retriever"]["mrr"] == pytest.approx((1 / 3 + 0) / 2)
    best = {g["reference"]: g["method"] for g in json.loads((tmp_path / "details.json").read_text())["intervals"]
            if g["best"]}
    assert best == {"retriever": "llm-x", "popularity": "fused-x-popularity"}
    assert read_results(tmp_path)["llm-x"].targets == {"u1": [5.0, 4.0], "u2": [3.0]}
