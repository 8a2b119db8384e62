"""The top-N protocol's samples (data/topn.py) on Ray Data: choose the retriever on the valid
lists, fit it once per fit (test, valid, each training fold), then cut every user's windows and
retrieve each window's candidates in batches, in a Ray Data job:

  interactions + roles -> group by user -> windows (every item rated before each) -> batches of
  windows: top C of their fit's retriever, ids and scores -> samples (SAMPLE_SCHEMA)

The fitted retrievers go to the object store once, one at a time (the driver holds one), and
each retrieving actor reads each of them from there once. The test fit is saved as
DIR/retriever/ with the ratings it was fitted on (`history.parquet`, each user's rated items for
Serve's /recommend by user id); a ranker checkpoint carries both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from alro_ray.classical.retrievers import Retriever, RetrieverSpec, recall_at_n
from alro_ray.config import Config, RetrievalConfig
from alro_ray.data.dataset import SAMPLE_SCHEMA
from alro_ray.data.per_user import map_users
from alro_ray.data.sampling import sample_users
from alro_ray.data.topn import TEST, TRAIN, VALID, fit_frame, fit_masks, mark_roles, topn_sample, user_windows
from alro_ray.errors import DataError

log = logging.getLogger("alro_ray")

RETRIEVER_DIR = "retriever"  # in the prepared directory and in a ranker checkpoint
HISTORY_FILE = "history.parquet"  # in RETRIEVER_DIR: user, item, rating, timestamp of its fit
WINDOW_BATCH = 256  # windows scored per matrix product


def grid(r: RetrievalConfig, seed: int) -> list[RetrieverSpec]:
    """Every retriever setting `data.retrieval` asks to try, in a fixed order."""
    specs = []
    for name in r.retrievers:
        if name == "ease":
            specs += [RetrieverSpec("ease", reg=x, seed=seed) for x in r.ease_reg]
        elif name == "als":
            specs += [RetrieverSpec("als", reg=x, factors=f, iterations=r.als_iterations, seed=seed)
                      for f in r.als_factors for x in r.als_reg]
        else:
            specs.append(RetrieverSpec(name, seed=seed))
    return specs


def choose(specs: list[RetrieverSpec], fit: pd.DataFrame, windows: list[dict], catalogue: list[str],
           c: int, keep: dict | None = None) -> tuple[RetrieverSpec, dict[str, float]]:
    """The setting with the highest recall@C on the valid `windows` (fitted on `fit`, the ratings
    outside the valid and test windows); the first on a tie. Also every setting's recall. `keep`,
    when given, receives the chosen setting's fit under "valid" (the valid lists' retriever: not
    fitted twice; only the best so far is held, so one grid point at a time is in memory)."""
    seen, targets = [w["seen"] for w in windows], [w["target_items"] for w in windows]
    recall = {}
    for spec in specs:
        model = Retriever(spec, catalogue).fit(fit)
        retrieved, _ = model.top_n(seen, c)
        recall[spec.label()] = recall_at_n(retrieved, targets)
        log.info("retriever %s: valid recall@%d %.4f", spec.label(), c, recall[spec.label()])
        if keep is not None and (VALID not in keep or recall[spec.label()] > recall[keep[VALID].spec.label()]):
            keep[VALID] = model
        del model
    best = max(range(len(specs)), key=lambda i: (recall[specs[i].label()], -i))
    if keep is not None and keep.get(VALID) is not None and keep[VALID].spec != specs[best]:
        keep.pop(VALID)
    return specs[best], recall


def fit_retrievers(spec: RetrieverSpec, catalogue: list[str], marked: pd.DataFrame, masks: dict[str, np.ndarray],
                   fitted: dict, out: Path) -> dict:
    """Every fit's retriever (`fitted` holds those already made) put into the object store, one at
    a time: the driver holds one (a dense EASE is items² float32: 400 MB at 10,000 items). The test
    fit is saved with its ratings as out/retriever/."""
    import ray  # the Ray Data job runs only when data is prepared

    refs = {}
    for name, mask in masks.items():
        frame = fit_frame(marked, mask) if name == TEST or name not in fitted else None
        model = fitted.pop(name, None) or Retriever(spec, catalogue).fit(frame)
        if name == TEST:
            model.save(out / RETRIEVER_DIR)
            frame.to_parquet(out / RETRIEVER_DIR / HISTORY_FILE, index=False)
        refs[name] = ray.put(model)
        del model, frame
    return refs


class Retrieve:
    """A Ray Data batch UDF: windows -> samples with the retriever's top C of their fit."""

    def __init__(self, retrievers: dict, candidates: int, permutations: int, seed: int):
        self.retrievers, self.c, self.permutations, self.seed = retrievers, candidates, permutations, seed
        self.got: dict[str, Retriever] = {}  # each fit read once: a batch mixes fits, and an object store
        # smaller than the fits together would otherwise restore them from disk batch after batch

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        import ray  # the retrievers live in the object store; a task reads them zero-copy

        out = []
        for fit, part in batch.groupby("fit", sort=True):
            retriever: Retriever = self.got.get(fit) or self.got.setdefault(fit, ray.get(self.retrievers[fit]))
            windows = part.to_dict("records")
            ids, scores = retriever.top_n([list(w["seen"]) for w in windows], self.c)
            for w, i, s in zip(windows, ids, scores):
                if len(i) < self.c:
                    raise DataError(f"user {w['user']}: only {len(i)} unrated items left to retrieve, "
                                    f"data.candidates is {self.c}")
                out.append(topn_sample(w, i, s, permutations=self.permutations, seed=self.seed))
        return pa.Table.from_pylist(out, schema=SAMPLE_SCHEMA)


def _windows_of(group: pd.DataFrame, history: int, folds: int, seed: int) -> list[dict]:
    return user_windows(group.sort_values("pos"), history, folds, seed)


def topn_samples(cfg: Config, df: pd.DataFrame, out: Path) -> tuple[object, pd.DataFrame, dict]:
    """The samples (a materialized Ray dataset), the interactions baselines and hints may fit on
    (outside the valid and test windows), and the protocol's stats."""
    import ray  # the Ray Data job runs only when data is prepared

    d, r = cfg.data, cfg.data.retrieval
    t0 = time.time()
    marked = mark_roles(df, d.history, d.holdout, d.windows_per_user)
    masks = fit_masks(marked, r.folds, d.seed)  # a frame per fit is made when it is fitted, then dropped
    valid_fit = fit_frame(marked, masks[VALID])
    catalogue = sorted(marked["item"].astype(str).unique())
    eligible = sorted(marked.loc[marked["role"] == TEST, "user"].astype(str).unique())
    if not eligible:
        raise DataError(f"no user has the H + 2·holdout = {d.history + 2 * d.holdout} ratings a valid and a "
                        f"test list need")
    sampled, sampling = sample_users(valid_fit, d.user_sampling, d.sampled_users, d.seed, d.sampling_penalty,
                                     d.sampling_clusters)
    # Users left out by the sampling keep their valid and test lists; their training windows make none.
    marked.loc[marked["role"].eq(TRAIN) & ~marked["user"].astype(str).isin(set(sampled)), "window"] = -1

    rng = np.random.default_rng(d.seed)
    select = set(rng.choice(eligible, size=min(r.select_users, len(eligible)), replace=False).tolist())
    valid_users = marked[marked["user"].astype(str).isin(select)]
    valid_windows = [w for _, g in valid_users.groupby("user", sort=True)
                     for w in user_windows(g, d.history, r.folds, d.seed) if w["split"] == VALID]
    fitted: dict = {}
    spec, recall = choose(grid(r, d.seed), valid_fit, valid_windows, catalogue, d.candidates, keep=fitted)
    log.info("retriever chosen on %d valid lists: %s (recall@%d %.4f), %.1f s", len(valid_windows),
             spec.label(), d.candidates, recall[spec.label()], time.time() - t0)
    refs = fit_retrievers(spec, catalogue, marked, masks, fitted, out)

    # Every rating of the users with a window: a window's retriever input is all she rated before it.
    with_window = marked.loc[marked["role"].ne(TRAIN) | marked["window"].ge(0), "user"].unique()
    windows = map_users(marked[marked["user"].isin(with_window)], _windows_of,
                        dict(history=d.history, folds=r.folds, seed=d.seed)).materialize()
    samples = windows.map_batches(
        Retrieve, batch_format="pandas", batch_size=WINDOW_BATCH,
        compute=ray.data.ActorPoolStrategy(size=d.tokenize_actors),
        fn_constructor_kwargs=dict(retrievers=refs, candidates=d.candidates, permutations=d.permutations,
                                   seed=d.seed),
    ).materialize()
    lists = list_stats(samples)
    if not d.keep_empty_train_lists:  # a list without a positive teaches the retriever's order, nothing else
        samples = samples.filter(lambda r: r["split"] != TRAIN or any(x > 0 for x in r["candidate_ratings"])).materialize()
    windows_in = windows.select_columns(["split"]).to_pandas()["split"].value_counts().to_dict()
    stats = {"protocol": "topn", "holdout": d.holdout, "user_sampling": sampling,
             "retrieval": {"retriever": spec.label(), "settings": spec.__dict__, "valid_recall": recall,
                           "valid_lists": len(valid_windows), "catalogue_items": len(catalogue),
                           "windows": {s: int(windows_in.get(s, 0)) for s in (TRAIN, VALID, TEST)},
                           "fit_interactions": {k: int(m.sum()) for k, m in masks.items()}},
             **lists, "lists_dropped": {"train: no retrieved positive": int(windows_in.get(TRAIN, 0) - samples.filter(
                 expr=f"split == '{TRAIN}'").count())}}
    return samples, valid_fit, stats


def list_stats(samples) -> dict:
    """Per split: the recall of the candidate lists (retrieved positives / held-out positives,
    recall@C), and the lists holding at least one positive."""
    frame = samples.select_columns(["split", "candidate_ratings", "target_ratings"]).to_pandas()
    out: dict = {"candidate_recall": {}, "lists_with_a_positive": {}}
    for split, part in frame.groupby("split"):
        hits = part["candidate_ratings"].map(lambda r: sum(x > 0 for x in r))
        wanted = part["target_ratings"].map(lambda r: sum(x > 0 for x in r))
        ok = wanted > 0
        out["candidate_recall"][split] = float((hits[ok] / wanted[ok]).mean()) if ok.any() else 0.0
        out["lists_with_a_positive"][split] = int((hits > 0).sum())
    return out
