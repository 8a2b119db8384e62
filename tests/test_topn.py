"""The top-N protocol end to end: `alro prepare` with data.protocol topn on a real local Ray, every
list's candidates checked against the fit that may serve it, and (slow) a comparison on it."""

import json

import pandas as pd
import pytest

from alro_ray.classical.retrievers import Retriever, RetrieverSpec, load_retriever
from alro_ray.config import load_config
from alro_ray.data.dataset import read_split, read_stats
from alro_ray.data.prepare import clean_interactions
from alro_ray.data.sources import read_source
from alro_ray.data.topn import fit_frames, fit_name, mark_roles, user_windows

TOPN = ["data.protocol=topn", "data.holdout=3", "data.candidates=8", "data.windows_per_user=2",
        "data.retrieval.folds=3", "data.retrieval.retrievers=[ease, popularity]", "data.retrieval.ease_reg=[20]",
        "data.permutations=1"]


@pytest.fixture(scope="module")
def topn_data(tmp_path_factory, ray_local):
    from alro_ray.data.prepare import prepare

    cfg = load_config("configs/tiny.yaml", TOPN)
    out = tmp_path_factory.mktemp("topn") / "data"
    prepare(cfg, out)
    return cfg, out


def the_log(cfg) -> pd.DataFrame:
    d = cfg.data
    return clean_interactions(read_source(d.dataset, d.data_dir, d.on_bad_row, d.synthetic, d.rating_scale,
                                          d.grading))[0]


def test_the_lists_and_their_counts(topn_data):
    cfg, out = topn_data
    stats = read_stats(out)
    test, valid, train = (read_split(out, s) for s in ("test", "valid", "train"))
    log = the_log(cfg)
    eligible = (log.groupby("user").size() >= cfg.data.history + 2 * cfg.data.holdout).sum()
    assert stats.protocol == "topn" and len(test) == len(valid) == eligible == stats.users_per_split["test"]
    assert stats.retrieval["retriever"] in stats.retrieval["valid_recall"]
    # windows in = lists out + dropped (training lists without a retrieved positive)
    assert stats.retrieval["windows"]["train"] == len(train) + stats.lists_dropped["train: no retrieved positive"]
    assert all(any(r > 0 for r in row) for row in train["candidate_ratings"])
    assert all(len(set(c)) == cfg.data.candidates for c in test["candidate_ids"])
    assert 0 < stats.candidate_recall["test"] < 1 and stats.lists_with_a_positive["test"] <= len(test)
    # a list's relevance is the rating of a held-out item, 0 for the rest
    for row in test.head(20).to_dict("records"):
        held = dict(zip(row["target_items"], row["target_ratings"]))
        assert list(row["candidate_ratings"]) == [held.get(i, 0.0) for i in row["candidate_ids"]]
    assert load_retriever(out / "retriever").spec.name == stats.retrieval["settings"]["name"]


def test_every_list_came_from_a_fit_without_its_positives(topn_data):
    """Each list's candidates are exactly what the fit its window may see retrieves (test: outside
    the test windows; valid: outside valid and test; train: outside its fold's training windows),
    and that fit holds none of the list's positives. Retrieving a training list from the test fit
    instead (a leak: it holds the training windows) changes some lists, so the check can fail."""
    cfg, out = topn_data
    d = cfg.data
    marked = mark_roles(the_log(cfg), d.history, d.holdout, d.windows_per_user)
    fits = fit_frames(marked, d.retrieval.folds, d.seed)
    spec = RetrieverSpec(**read_stats(out).retrieval["settings"])
    catalogue = sorted(marked["item"].astype(str).unique())
    fitted = {name: Retriever(spec, catalogue).fit(f) for name, f in fits.items()}
    windows = {(w["user"], w["split"], w["window"]): w for _, g in marked.groupby("user")
               for w in user_windows(g, d.history, d.retrieval.folds, d.seed)}
    leaky_differs = 0
    for split in ("train", "valid", "test"):
        for row in read_split(out, split).to_dict("records"):
            w = windows[(row["user"], split, row["window"])]
            name = fit_name(split, row["user"], d.retrieval.folds, d.seed)
            held = set(zip(fits[name]["user"].astype(str), fits[name]["item"].astype(str)))
            assert not {(row["user"], i) for i in row["target_items"]} & held, (row["user"], split, name)
            expected = fitted[name].top_n([w["seen"]], d.candidates)[0][0]
            assert sorted(row["candidate_ids"]) == sorted(expected), (row["user"], split, name)
            if split == "train":
                leaky_differs += sorted(fitted["test"].top_n([w["seen"]], d.candidates)[0][0]) != sorted(expected)
    assert leaky_differs > 0


@pytest.mark.slow
def test_compare_on_the_top_n_protocol(tmp_path, ray_local):
    """The ladder's SFT row, the retriever's own order and fusion with it, all on the same lists,
    scored end to end (each row's NDCG recomputed from its predictions)."""
    from alro_ray.evaluate.compare import CompareSettings, run_compare
    from alro_ray.evaluate.results import ndcg_from_predictions, read_predictions

    cfg = load_config("configs/tiny.yaml", TOPN + ["train.epochs=1"])
    table = run_compare(cfg, tmp_path, CompareSettings(ladder=["SFT"], baselines=["popularity"], bootstrap=[],
                                                       mode="one-pass", fuse=["retriever"]))
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {"retriever", "popularity", "llm-sft-one-pass", "fused-sft-one-pass-retriever"} <= set(rows)
    assert set(rows["retriever"]) == {"ndcg@5", "ndcg@10", "ndcg@20", "recall@10", "hr@10", "mrr", "ndcg_within@10"}
    frame = read_predictions(tmp_path / "predictions.parquet")
    assert ndcg_from_predictions(frame)["retriever"] == pytest.approx(rows["retriever"]["ndcg@10"])
    assert table["retriever"]["lists"] == len(read_split(tmp_path / "data", "test"))
    details = json.loads((tmp_path / "details.json").read_text())
    assert {g["reference"] for g in details["intervals"]} >= {"retriever"}


@pytest.fixture(scope="module")
def topn_ranker(topn_data, tmp_path_factory):
    """A ranker checkpoint saved from the top-N data (a random adapter): it carries the retriever."""
    import torch

    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
    from alro_ray.rank.ranker import save_ranker

    cfg, out = topn_data
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # at its zero init the adapter would change nothing
            p.data.normal_(0, 0.5)
    return save_ranker(tmp_path_factory.mktemp("topn-ranker") / "ranker", model, load_tokenizer("tiny-random"), cfg,
                       read_stats(out), out)


def test_a_top_n_ranker_recommends_from_the_catalogue(topn_data, topn_ranker):
    """A ranker saved from top-N data carries its retriever: a known user's history (or any rated
    history) gives k items from the retriever's C candidates, none of them already rated."""
    from alro_ray.rank.ranker import load_ranker
    from alro_ray.rank.recommend import Catalogue, UnknownUser, recommend

    cfg, _ = topn_data
    ranker, catalogue = load_ranker(topn_ranker), Catalogue(topn_ranker)
    assert ranker.info.protocol == "topn"
    user = next(iter(catalogue.histories))
    items, ratings = catalogue.history_of(user)
    rec = recommend(ranker, catalogue, items, ratings, k=3, mode="one-pass")
    assert len(rec.items) == 3 and set(rec.items) <= set(rec.retrieved) and not set(rec.retrieved) & set(items)
    assert rec.retrieved == catalogue.retriever.top_n([items], cfg.data.candidates)[0][0]
    assert rec.scores == sorted(rec.scores, reverse=True)
    with pytest.raises(UnknownUser, match="not known"):
        catalogue.history_of("nobody")
    with pytest.raises(Exception, match="rated history"):
        recommend(ranker, catalogue, [], [], k=3)


@pytest.mark.slow  # default-run time (issue 26): a Serve app of its own; test_serve covers Serve over HTTP
def test_serve_recommends_over_http(topn_ranker, ray_local):
    """POST /recommend on a real Serve app: a known user id or a rated history gives the top k of
    the retriever's candidates, as the checkpoint ranks them in-process; an unknown user is a 404
    and an empty history, both or neither a 422, each with a JSON reason."""
    import socket

    import httpx
    from ray import serve

    from alro_ray.rank.ranker import load_ranker
    from alro_ray.rank.recommend import Catalogue, recommend
    from alro_ray.serve.app import run_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = run_serve({"default": str(topn_ranker)}, port=port, blocking=False, num_cpus=1, ingress_num_cpus=0,
                    default_mode="one-pass")
    try:
        catalogue = Catalogue(topn_ranker)
        user = sorted(catalogue.histories)[0]
        items, ratings = catalogue.history_of(user)
        local = recommend(load_ranker(topn_ranker), catalogue, items, ratings, k=4, mode="one-pass")
        with httpx.Client(base_url=url, timeout=120) as client:
            by_id = client.post("/recommend", json={"user": user, "k": 4})
            assert by_id.status_code == 200, by_id.text
            body = by_id.json()
            assert body["items"] == local.items and body["retrieved"] == local.retrieved
            history = [{"id": i, "rating": r} for i, r in zip(items, ratings)][-8:]
            by_history = client.post("/recommend", json={"history": history, "k": 2})
            assert by_history.status_code == 200 and len(by_history.json()["items"]) == 2
            assert not set(by_history.json()["retrieved"]) & {h["id"] for h in history}
            for req, status, says in [({"user": "nobody"}, 404, "not known"), ({"history": []}, 422, "history"),
                                      ({"user": user, "history": history}, 422, "either"), ({}, 422, "either"),
                                      ({"user": user, "k": 999}, 422, "k")]:
                r = client.post("/recommend", json=req)
                assert r.status_code == status and says in r.json()["error"], (req, r.status_code, r.text)
    finally:
        serve.shutdown()
