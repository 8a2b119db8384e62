"""Hybrid ranking (alro_ray/rank/fusion.py) and the paired bootstrap, on worked examples."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import random_ranker

from alro_ray.errors import AlroError
from alro_ray.evaluate.fusion_fit import choose_weight, fuse_predictions
from alro_ray.rank.fusion import fuse, fused_order, normalise, read_fusion_defaults, save_fusion_defaults
from alro_ray.rank.metrics import paired_bootstrap


def test_normalise_by_hand():
    z = math.sqrt(1.5)  # [1, 2, 3]: mean 2, population std sqrt(2/3)
    assert normalise([1, 2, 3], "score") == pytest.approx([-z, 0, z])
    assert normalise([4, 4, 4], "score").tolist() == [0, 0, 0]
    assert normalise([0.5, 0.9, 0.1], "borda").tolist() == [1, 2, 0]
    assert normalise([1, 1, 0], "borda").tolist() == [1.5, 1.5, 0]  # ties share the mean rank
    assert normalise([0.5, 0.9, 0.1], "rrf") == pytest.approx([1 / 62, 1 / 61, 1 / 63])
    with pytest.raises(AlroError, match="unknown fusion method"):
        normalise([1, 2], "max")
    with pytest.raises(AlroError, match="finite"):
        normalise([1, float("nan")], "score")


def test_fused_order_by_hand():
    llm, cls = [3, 2, 1], [1, 2, 3]  # Borda points: llm [2, 1, 0], classical [0, 1, 2]
    assert fused_order(llm, cls, 1.0, "borda") == [0, 1, 2]
    assert fused_order(llm, cls, 0.0, "borda") == [2, 1, 0]
    assert fused_order(llm, cls, 0.7, "borda") == [0, 1, 2]  # [1.4, 1.0, 0.6]
    # w = 0.5: every fused score is 1; ties go to the classical score, then prompt position.
    assert fuse(llm, cls, 0.5, "borda").tolist() == [1, 1, 1]
    assert fused_order(llm, cls, 0.5, "borda") == [2, 1, 0]
    assert fused_order([1, 1, 1], [0, 0, 0], 0.5, "score") == [0, 1, 2]
    with pytest.raises(AlroError, match="3 LLM scores but 2"):
        fuse([1, 2, 3], [1, 2], 0.5, "score")


def test_choose_weight_by_hand():
    llm, cls = [[3, 2, 1]], [[1, 2, 3]]
    # Only A is relevant: w = 1 puts it first (NDCG 1); w <= 0.5 puts it last: 31/log2(4) / 31 = 0.5.
    w, curve = choose_weight(llm, cls, [[5, 0, 0]], "borda", grid=(0, 0.5, 1))
    assert (w, curve) == (1.0, {0.0: 0.5, 0.5: 0.5, 1.0: 1.0})
    # Only C is relevant: w = 0 and 0.5 both give NDCG 1; the first in grid order wins.
    w, curve = choose_weight(llm, cls, [[0, 0, 5]], "borda", grid=(0, 0.5, 1))
    assert (w, curve) == (0.0, {0.0: 1.0, 0.5: 1.0, 1.0: 0.5})


def test_paired_bootstrap_by_hand():
    assert paired_bootstrap([1, 1, 1], [0, 0, 0], n=200) == (1.0, 1.0, 1.0)
    # Differences [0, 1]: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles of 10000 resamples are 0 and 1.
    mean, lo, hi = paired_bootstrap([0.5, 1.0], [0.5, 0.0], n=10000, seed=3)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    assert paired_bootstrap([0.5, 1.0], [0.5, 0.0], seed=3) == (mean, lo, hi)  # seeded
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 2], [1])


def _write_split(d, split, rows):
    (d / split).mkdir()
    pd.DataFrame(rows).to_parquet(d / split / "part.parquet")


def test_fuse_predictions_chooses_on_valid_and_applies_to_test(tmp_path):
    # Fit data: item-mean prefers c > b > a. Valid: the LLM is right (a is the relevant item),
    # Borda points a, b, c: LLM [2, 1, 0], item-mean [0, 1, 2]; a leads from w = 0.6 on (at 0.5
    # all tie and item-mean's c wins), so the first best grid weight is 0.6.
    fit = pd.DataFrame({"user": ["f"] * 3, "item": ["a", "b", "c"], "rating": [1.0, 3.0, 5.0],
                        "timestamp": [1, 2, 3]})
    fit.to_parquet(tmp_path / "fit_interactions.parquet")
    row = {"candidate_ids": ["a", "b", "c"], "history_items": [], "history_ratings": [], "window": 0}
    _write_split(tmp_path, "valid", [{**row, "user": "v", "candidate_ratings": [5.0, 0.0, 0.0]}])
    _write_split(tmp_path, "test", [{**row, "user": "t", "candidate_ratings": [0.0, 0.0, 5.0]}])
    pred = {"mode": "one-pass", "scores": [-0.1, -2.0, -3.0], "seconds": 0.5, "repaired": False,
            "predicted_ids": ["a", "b", "c"], "predicted_ratings": [0.0, 0.0, 0.0], "rank_of_position": [1, 2, 3]}
    valid, test = pd.DataFrame([{**pred, "user": "v"}]), pd.DataFrame([{**pred, "user": "t"}])
    fused, info = fuse_predictions(tmp_path, valid, test, ["item-mean"], method="borda")
    assert info["fused-one-pass-item-mean"]["weight"] == 0.6
    assert info["fused-one-pass-item-mean"]["valid_ndcg@10"] == 1.0
    got = fused.iloc[0]
    assert got["mode"] == "fused-one-pass-item-mean" and got["user"] == "t"
    assert list(got["predicted_ids"]) == ["a", "b", "c"] and list(got["predicted_ratings"]) == [0, 0, 5.0]
    assert list(got["rank_of_position"]) == [1, 2, 3] and got["seconds"] == 0.5
    with pytest.raises(AlroError, match="no valid-split predictions"):
        fuse_predictions(tmp_path, valid.assign(mode="generate"), test, ["item-mean"])


# ---------------------------------------------------------------------------------------------
# Through `alro evaluate --fuse`, on a tiny ranker trained (here: randomised) on hinted prompts.


@pytest.fixture(scope="module")
def hinted_ranker(ray_local, tmp_path_factory):
    return random_ranker(tmp_path_factory.mktemp("fuse"), "data.hints=[item_mean, popularity_rank]")


@pytest.mark.slow  # ~90 s on 2 CPUs: a prepare and an evaluation of two splits
def test_evaluate_fuse_adds_rows_with_a_valid_chosen_weight(hinted_ranker, tmp_path):
    from alro_ray.data.dataset import read_split
    from alro_ray.rank.ranker import load_ranker
    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation

    root = hinted_ranker
    ranker = load_ranker(root / "ranker")
    assert ranker.hints is not None and (root / "ranker" / "hints.parquet").is_file()
    test = read_split(root / "data", "test")
    row = test.iloc[0]
    # Serve's path renders the same prompt as prepare did, hints computed from the checkpoint's fit.
    notes = ranker.hint_notes(list(row["candidate_ids"]))
    assert all(n.startswith("mean rating: ") and "popularity rank: " in n for n in notes)
    assert f" {notes[0]}\n" in row["prompt"]

    metrics = run_evaluation(root / "ranker", tmp_path, settings=EvalSettings(
        modes="one-pass,generate", baselines=["item-mean"], fuse=["item-mean"], fusion="score", batch_size=4,
        save_fusion=True))
    saved = read_fusion_defaults(root / "ranker")  # Serve's defaults, the weights chosen here
    assert {k: v["weight"] for k, v in saved.items()} == {
        f"{m}/item-mean": metrics["fusion"][f"fused-{m}-item-mean"]["weight"] for m in ("one-pass", "generate")}
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    fused_modes = {"fused-one-pass-item-mean", "fused-generate-item-mean"}
    assert set(preds["mode"]) == {"one-pass", "generate"} | fused_modes
    assert set(preds["split"]) == {"test"} and preds.groupby("mode").size().eq(len(test)).all()
    valid = pd.read_parquet(tmp_path / "valid_predictions.parquet")
    assert set(valid["split"]) == {"valid"} and set(valid["mode"]) == {"one-pass", "generate"}
    for name in fused_modes:
        f = metrics["fusion"][name]
        assert f["weight"] in f["valid_curve"] and f["valid_ndcg@10"] == max(f["valid_curve"].values())
        assert metrics["modes"][name]["lists"] == len(test)
        if f["weight"] == 0.0:  # all classical: the fused NDCG is the baseline's on the same lists
            assert metrics["modes"][name]["ndcg@10"] == pytest.approx(metrics["baselines"]["item-mean"]["ndcg@10"])
    # one-pass scores are log-probabilities; generate's are minus the rank.
    gen = preds[preds["mode"] == "generate"].iloc[0]
    assert sorted(gen["scores"]) == [-c for c in range(len(gen["scores"]), 0, -1)]


def test_serve_fuses_with_the_request_hints_or_the_saved_fit(ray_local, tmp_path):
    """The ranker deployment's batch path in-process (no Serve started): a request's `fusion`
    mixes the ranker's scores with MF's or item-mean's, from the request's hints, else the
    checkpoint's fit by id (an unknown id gets the known ones' mean); nothing to fuse with is a 422."""
    from alro_ray.data.prompts import Item
    from alro_ray.rank.ranker import load_ranker
    from alro_ray.serve.contract import Fusion, RankJob
    from alro_ray.serve.deployments import RankerDeployment
    from alro_ray.serve.registry import load_registry
    from alro_ray.serve.schemas import make_schemas
    from alro_ray.serve.settings import ServeSettings

    root = random_ranker(tmp_path, "data.hints=[item_mean,mf_score]")
    settings = ServeSettings.from_dict({"adapters": {"default": str(root / "ranker")}, "torch_threads": 1})
    deployment = RankerDeployment.func_or_class(settings, load_registry(settings.adapters))
    fit = load_ranker(root / "ranker").hints
    known = list(fit.items[:2])

    def request(fusion=None, hints=None, ids=("p", "q", "r")):
        return RankJob("default", "one-pass", history=[(Item("Old", "Noir"), 4.0)],
                       candidates=[Item(f"T{j}", "Noir") for j in range(3)], candidate_ids=list(ids),
                       candidate_hints=hints, history_ids=[None], fusion=Fusion(**fusion) if fusion else None)

    given = [{"mf_score": 1.0}, {"mf_score": 5.0}, {"mf_score": 3.0}]
    # The hints are rendered into the prompt too (the ranker was trained with them): same hints, same prompt.
    plain, only_mf, only_llm, borda, by_id, plain_by_id, nothing = deployment._run_batch([
        request(hints=given), request({"classical": "mf", "weight": 0.0, "method": "score"}, given),
        request({"classical": "mf", "weight": 1.0, "method": "score"}, given),
        request({"classical": "mf", "weight": 0.5, "method": "borda"}, given),
        request({"classical": "item-mean", "weight": 0.0, "method": "score"}, ids=[known[0], "unknown", known[1]]),
        request(ids=[known[0], "unknown", known[1]]), request({"classical": "mf", "weight": 0.5, "method": "score"})])
    assert plain.fusion is None
    assert only_mf.order == [1, 2, 0] and only_mf.fusion.classical == "mf"
    assert only_llm.order == plain.order
    assert borda.order == fused_order(plain.scores, [1.0, 5.0, 3.0], 0.5, "borda")
    assert borda.scores == pytest.approx(fuse(plain.scores, [1.0, 5.0, 3.0], 0.5, "borda").tolist())
    means = [v["mean_rating"] for v in fit.values(known)]
    cls = [means[0], sum(means) / 2, means[1]]
    assert by_id.order == fused_order(plain_by_id.scores, cls, 0.0, "score")
    assert nothing.status == 422 and "pass candidates[].hints.mf_score" in nothing.error

    schema = make_schemas(settings, 5)["RankRequest"]
    body = {"history": [{"title": "Old"}], "candidates": [{"id": "a", "title": "T"}, {"id": "b", "title": "U"}]}
    assert schema(**body, fusion={"classical": "mf", "weight": 0.3}).fusion.method is None  # filled: score
    assert schema(**body, fusion={"classical": "mf"}).fusion.weight is None  # filled: the adapter's saved one
    for bad in ({"classical": "mf", "weight": 1.5}, {"classical": "svd", "weight": 0.5}, {"weight": 0.5}):
        with pytest.raises(ValueError):
            schema(**body, fusion=bad)

    # --save-fusion without --fuse is refused before any ranking
    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation

    with pytest.raises(AlroError, match="give --fuse mf"):
        run_evaluation(root / "ranker", tmp_path / "ev", settings=EvalSettings(modes="one-pass", save_fusion=True))


def test_saved_fusion_weights_round_trip_and_fill_requests(tmp_path):
    """fusion.json: only the classical models Serve fuses with, merged with earlier entries, refused
    when malformed; a request without a weight takes the saved one for its mode and model."""
    from alro_ray.serve.contract import Fusion
    from alro_ray.serve.registry import AdapterEntry

    def info(mode, baseline, weight, method="score"):
        return {f"fused-{mode}-{baseline}": {"mode": mode, "baseline": baseline, "method": method, "weight": weight,
                                             "valid_ndcg@10": 0.9, "valid_lists": 40}}

    assert read_fusion_defaults(tmp_path) == {}
    save_fusion_defaults(tmp_path, {**info("one-pass", "mf", 0.3), **info("one-pass", "popularity", 0.5)}, "ev1")
    save_fusion_defaults(tmp_path, info("score", "item-mean", 0.7, "rrf"), "ev2")  # a later run adds
    saved = read_fusion_defaults(tmp_path)
    assert {k: (v["weight"], v["method"], v["evaluation"]) for k, v in saved.items()} == {
        "one-pass/mf": (0.3, "score", "ev1"), "score/item-mean": (0.7, "rrf", "ev2")}
    with pytest.raises(AlroError, match="Serve fuses with mf, item-mean only"):
        save_fusion_defaults(tmp_path, info("one-pass", "popularity", 0.5), "ev3")

    entry = AdapterEntry("b", str(tmp_path), None, {}, saved)
    assert entry.fusion_settings("one-pass", "mf", None, None) == Fusion("mf", 0.3, "score", weight_from="adapter")
    assert entry.fusion_settings("one-pass", "mf", 0.9, None) == Fusion("mf", 0.9, "score")
    with pytest.raises(ValueError, match="none saved for mode 'generate' with 'mf'.*--save-fusion"):
        entry.fusion_settings("generate", "mf", None, None)
    with pytest.raises(ValueError, match="chosen for fusion method 'rrf', not 'borda'"):
        entry.fusion_settings("score", "item-mean", None, "borda")

    for bad in ("{", '{"format": "other", "weights": {}}', '{"format": "alro-fusion-v1", "weights": '
                '{"one-pass/svd": {"weight": 0.1, "method": "score"}}}', '{"format": "alro-fusion-v1", "weights": '
                '{"one-pass/mf": {"weight": 2, "method": "score"}}}'):
        (tmp_path / "fusion.json").write_text(bad)
        with pytest.raises(AlroError, match="fusion.json.*--save-fusion"):
            read_fusion_defaults(tmp_path)
