"""The Ray Data pipeline that turns raw interaction logs into ALRO samples (spec §1-2).

  read (driver) -> clean and count -> split users -> Ray Data: each user's rows (per_user) -> windows,
  shuffled candidates, gold ranking, permutations -> render prompts and tokenize (actor pool,
  one tokenizer per actor) -> Parquet under out/{train,valid,test} + stats.json (the contract
  those files follow, and how to read them back, is `data/dataset.py`)

Reading stays in the driver because a malformed line must be reported with its file and line
number (and the raw formats are line-oriented); everything per user runs in Ray Data.
Counts are kept so that nothing disappears silently: interactions read = used + dropped (by
reason), users read = kept + dropped (by reason).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alro_ray.cluster import ensure_ray, quiet_ray_data
from alro_ray.config import Config, save_config, to_dict
from alro_ray.errors import DataError
from alro_ray.model.loading import load_tokenizer
from alro_ray.data import hints as hint_fit
from alro_ray.data.dataset import ROW_SCHEMA, SAMPLE_SCHEMA, PreparedStats, write_stats
from alro_ray.data.prompts import SampleRenderer, render_response, shown_text
from alro_ray.data.per_user import map_users
from alro_ray.data.retrieval import topn_samples
from alro_ray.data.samples import SPLITS, assign_splits, permuted_gold, user_samples
from alro_ray.data.sources import SourceData, read_source
from alro_ray.data.tokenize import RankTokenizer

log = logging.getLogger("alro_ray")

# ---------------------------------------------------------------------------------------------
# Driver side: cleaning and counting.


def clean_interactions(source: SourceData) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop interactions that cannot make a sample, counting each by reason."""
    df = source.interactions
    dropped: dict[str, int] = {f"bad row: {k}": v for k, v in source.bad_rows.items()
                               if not k.startswith("metadata: ")}
    titled = set(source.items.loc[source.items["title"].str.strip() != "", "item"])
    known = df["item"].isin(titled)
    if (~known).any():
        dropped["item without title"] = int((~known).sum())
    df = df[known]
    # A user who rated an item twice keeps the latest rating: a candidate list must not repeat.
    df = df.sort_values(["user", "item", "timestamp"], kind="stable")
    dup = df.duplicated(["user", "item"], keep="last")
    if dup.any():
        dropped["repeated (user, item): earlier rating"] = int(dup.sum())
    return df[~dup].reset_index(drop=True), dropped


def item_table(source: SourceData, cfg: Config) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
    """item id -> (title, attributes) as prompts show them: one line each, the template's markers
    neutralised (`prompts.neutralise`), over-long text cut. Also the counts of titles and
    attributes neutralised and of titles cut."""
    d = cfg.data

    def shown(col: pd.Series, limit: int) -> tuple[list[str], int, int]:
        texts = [shown_text(text, limit, source.attribute_name) for text in col.astype(str)]
        return [t.text for t in texts], sum(t.neutralised > 0 for t in texts), sum(t.cut for t in texts)

    titles, titles_neutralised, cut = shown(source.items["title"], d.max_title_chars)
    attrs, attributes_neutralised, _ = shown(source.items["attributes"], d.max_attribute_chars)
    counts = {"titles_truncated": cut, "titles_neutralised": titles_neutralised,
              "attributes_neutralised": attributes_neutralised}
    return dict(zip(source.items["item"], zip(titles, attrs))), counts


def write_items(items: dict[str, tuple[str, str]], path: Path) -> None:
    ids = list(items)
    pq.write_table(pa.table({"item": ids, "title": [items[i][0] for i in ids],
                             "attributes": [items[i][1] for i in ids]}), path)


# ---------------------------------------------------------------------------------------------
# Ray Data stages.


def _user_group(group: pd.DataFrame, **kwargs) -> list[dict]:
    group = group.sort_values(["timestamp", "item"], kind="stable")
    return user_samples(
        str(group["user"].iloc[0]),
        group["item"].tolist(),
        group["rating"].tolist(),
        group["timestamp"].tolist(),
        split=str(group["split"].iloc[0]),
        **kwargs,
    )


class RenderTokenize:
    """Renders each sample's prompt(s) and tokenizes them; one tokenizer per actor."""

    def __init__(self, tokenizer: str, cache_dir: str | None, candidates: int,
                 items: dict, attribute_name: str, domain_plural: str, hints=None):
        self.tok = RankTokenizer(load_tokenizer(tokenizer, cache_dir), candidates)
        self.render = SampleRenderer(items, attribute_name, domain_plural, hints)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            row["candidate_notes"] = self.render.notes(row) or []  # computed once, kept for re-rendering
            prefix, suffix = self.render.prefix(row), self.render.suffix(row)
            enc = self.tok.encode(prefix, suffix, row["gold_order"])
            perm_ids, perm_slots = [], []
            for perm in row["perm_orders"]:
                p_enc = self.tok.encode(prefix, self.render.suffix(row, perm),
                                        permuted_gold(row["gold_order"], perm))
                perm_ids.append(p_enc.input_ids)
                perm_slots.append(p_enc.slot_positions)
            row.update(
                prompt=prefix + suffix,
                response=render_response(row["gold_order"]),
                input_ids=enc.input_ids,
                labels_mask=enc.labels_mask,
                slot_positions=enc.slot_positions,
                prefix_len=enc.prefix_len,
                n_prompt_tokens=enc.slot_positions[0],
                perm_input_ids=perm_ids,
                perm_slot_positions=perm_slots,
            )
            out.append(row)
        return pa.Table.from_pylist(out, schema=ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------


def prepare(cfg: Config, out_dir: str | Path) -> PreparedStats:
    """Run the whole pipeline; returns the stats also written to out_dir/stats.json."""
    import ray

    d = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The files below are rewritten in place: an earlier prepare's stats.json would vouch for a half
    # rewritten directory if this one fails. It is written again last, atomically (write_stats).
    (out / "stats.json").unlink(missing_ok=True)
    t0 = time.time()
    tokenizer_name = cfg.model.tokenizer or cfg.model.name
    # Fail on a tokenizer that splits an identifier before any work starts.
    tok = RankTokenizer(load_tokenizer(tokenizer_name, cfg.model.cache_dir), d.candidates)

    log.info("reading %s from %s", d.dataset, d.data_dir or "(generated)")
    source = read_source(d.dataset, d.data_dir, d.on_bad_row, d.synthetic, d.rating_scale, d.grading,
                         d.allow_negative_timestamps)
    log.info("read %d interactions, %d items", source.rows_read, len(source.items))
    df, dropped_interactions = clean_interactions(source)
    items, text_counts = item_table(source, cfg)

    # Every user read is counted, also one whose every interaction was dropped above (count 0).
    counts = df.groupby("user").size().reindex(source.interactions["user"].unique(), fill_value=0)
    source.interactions = source.interactions.iloc[:0]  # `df` holds the log from here: one copy, not two
    ensure_ray()
    quiet_ray_data(progress=True)
    if d.protocol == "topn":
        ds, fit, users, protocol_stats = topn_users_and_samples(cfg, df, counts, out)
    else:
        ds, fit, users, protocol_stats = rated_users_and_samples(cfg, df, counts)
    hints, hint_stats = fit_prompt_hints(cfg, fit, ds, out)
    ds = ds.map_batches(
        RenderTokenize,
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=d.tokenize_actors),
        fn_constructor_kwargs=dict(tokenizer=tokenizer_name, cache_dir=cfg.model.cache_dir,
                                   candidates=d.candidates, items=items,
                                   attribute_name=source.attribute_name,
                                   domain_plural=d.domain_plural or source.domain_plural, hints=hints),
    ).materialize()

    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        for old in (out / split).glob("*.parquet"):
            old.unlink()
        ds.filter(expr=f"split == '{split}'").write_parquet(str(out / split))
    lengths = ds.select_columns(["split", "n_prompt_tokens"]).to_pandas().groupby("split")["n_prompt_tokens"]
    rows = {s: int(lengths.size().get(s, 0)) for s in SPLITS}
    prompt_tokens = {s: float(lengths.mean().get(s, 0.0)) for s in SPLITS}

    pq.write_table(pa.Table.from_pandas(fit, preserve_index=False), out / "fit_interactions.parquet")
    write_items(items, out / "items.parquet")
    if hints is not None:
        hint_stats["hint_tokens_per_prompt"] = hint_tokens(ds, tok, items, source.attribute_name, hints)

    stats = PreparedStats(**{
        "dataset": d.dataset,
        "files": source.files,
        "interactions_read": source.rows_read,
        "interactions_used": int(len(df)) - users["interactions_unused"],
        "interactions_dropped": {**dropped_interactions,
                                 "users with too few interactions": users["interactions_unused"]},
        "metadata_rows_skipped": {k: v for k, v in source.bad_rows.items() if k.startswith("metadata: ")},
        "users_read": int(len(counts)),
        "users_kept": users["kept"],
        "users_dropped": users["dropped"],
        "users_per_split": users["per_split"],
        "rows": rows,
        "mean_prompt_tokens": prompt_tokens,
        **hint_stats,  # hints, hint_folds, hint_interactions, hint_train_interactions, hint_tokens_per_prompt
        **text_counts,  # titles_truncated, titles_neutralised, attributes_neutralised
        "rating_scale": list(d.rating_scale),
        "grading": source.grading,
        "ratings_used": {f"{r:g}": int(n) for r, n in users["ratings"].value_counts().sort_index().items()},
        "history": d.history,
        "candidates": d.candidates,
        "tokenizer": tokenizer_name,
        "identifier_ids": tok.identifier_ids,
        "domain_plural": d.domain_plural or source.domain_plural,
        "attribute_name": source.attribute_name,
        **protocol_stats,  # protocol; under topn the retriever, its recall, the sampling
        "seconds": round(time.time() - t0, 2),
        "config": to_dict(cfg),
    })
    save_config(cfg, out / "config.yaml")
    write_stats(stats, out)  # last: the directory is complete
    log.info("wrote %s: rows %s, mean prompt tokens %s, %.1f s", out, rows, prompt_tokens, stats.seconds)
    return stats


def rated_users_and_samples(cfg: Config, df: pd.DataFrame, counts: pd.Series) -> tuple[object, pd.DataFrame, dict, dict]:
    """data.protocol rated: users with H + C ratings split 8:1:1, each list the C items a user
    rated next (samples.py). Returns the samples (a materialized Ray dataset), what baselines and
    hints may fit on, the users' counts, and the protocol's stats."""
    d = cfg.data
    need = d.history + d.candidates
    kept = counts[counts >= need].index.tolist()
    users_dropped = {f"fewer than H+C={need} interactions": int((counts < need).sum())}
    splits = assign_splits(kept, d.split, d.seed)
    log.info("users: %d read, %d kept, %s", len(counts), len(kept), users_dropped)
    if not kept:
        raise DataError(f"no user has the {need} interactions a sample needs (H={d.history}, C={d.candidates})")
    df = df[df["user"].isin(splits)].copy()
    df["split"] = df["user"].map(splits)
    ds = map_users(df, _user_group, dict(history=d.history, candidates=d.candidates, windows=d.windows_per_user,
                                         permutations=d.permutations, seed=d.seed), SAMPLE_SCHEMA).materialize()
    # materialized before the actor pool starts: with tokenize_actors == CPUs the actors would hold
    # every CPU that the per-user tasks wait for (a hang)
    users = {"kept": len(kept), "dropped": users_dropped, "ratings": df["rating"],
             "per_split": {s: sum(1 for v in splits.values() if v == s) for s in SPLITS},
             "interactions_unused": int(counts[counts < need].sum())}
    return ds, fit_interactions(df, d.candidates), users, {"protocol": "rated"}


def topn_users_and_samples(cfg: Config, df: pd.DataFrame, counts: pd.Series,
                           out: Path) -> tuple[object, pd.DataFrame, dict, dict]:
    """data.protocol topn (data/topn.py, data/retrieval.py): every rating feeds the retrievers;
    a user with H + 2·holdout ratings gets a valid and a test list, every user with a training
    window training lists. Returns what `rated_users_and_samples` does."""
    d = cfg.data
    ds, fit, stats = topn_samples(cfg, df, out)
    per_user = ds.select_columns(["user", "split"]).to_pandas()
    listed = set(per_user["user"])
    users = {"kept": len(listed), "ratings": df["rating"], "interactions_unused": 0,
             "dropped": {f"no list (fewer than H + holdout = {d.history + d.holdout} ratings, or no training "
                         f"window kept)": int(len(counts) - len(listed))},
             "per_split": {s: int(per_user.loc[per_user["split"] == s, "user"].nunique()) for s in SPLITS}}
    log.info("top-N: users %d read, %d with lists, rows %s, candidate recall@%d %s", len(counts), len(listed),
             per_user["split"].value_counts().to_dict(), d.candidates, stats["candidate_recall"])
    return ds, fit, users, stats


def fit_interactions(df: pd.DataFrame, candidates: int) -> pd.DataFrame:
    """What baselines may fit on: every interaction of training users, and of valid/test users
    everything before their candidate window (their history may be used, never their candidates)."""
    df = df.sort_values(["user", "timestamp", "item"], kind="stable")
    from_end = df.groupby("user").cumcount(ascending=False)
    held_out = (df["split"] != "train") & (from_end < candidates)
    return df[~held_out].reset_index(drop=True)


def fit_prompt_hints(cfg: Config, fit: pd.DataFrame, samples, out: Path) -> tuple[object, dict]:
    """data.hints, cross-fitted (data/hints.py): the held-out fit on all of `fit`, saved as
    out/hints.parquet, and per fold of training users (`data.hint_folds`) a fit on `fit` without
    that fold's candidate windows, saved as out/hints_train-<fold>.parquet; (None, {"hints": []})
    without hints. Hint files of an earlier prepare are removed first."""
    for path in out.glob("hints*.parquet"):
        path.unlink()
    names, folds = cfg.data.hints, cfg.data.hint_folds
    if not names:
        return None, {"hints": []}
    windows = samples.filter(expr="split == 'train'").select_columns(["user", "candidate_ids"]).to_pandas()
    hints = hint_fit.cross_fit(fit, windows, names, folds, cfg.data.seed)
    hints.save(out)
    log.info("hints %s fitted on %d interactions for held-out rows; for training rows in %d fold(s), "
             "on %s (each fold's candidate ratings left out)", names, len(fit), folds, hints.fit_sizes)
    return hints, {"hints": list(names), "hint_folds": folds, "hint_interactions": len(fit),
                   "hint_train_interactions": round(sum(hints.fit_sizes) / folds)}


def hint_tokens(samples, tok: RankTokenizer, items: dict, attribute_name: str, hints) -> float:
    """Mean tokens the hints add to a prompt (its candidate lines with and without them)."""
    rows = samples.select_columns(["candidate_ids", "history_items", "history_ratings", "candidate_notes"]).to_pandas()
    plain, hinted = SampleRenderer(items, attribute_name, ""), SampleRenderer(items, attribute_name, "", hints)
    n = [len(tok.tokenizer.encode(hinted.suffix(r), add_special_tokens=False))
         - len(tok.tokenizer.encode(plain.suffix(r), add_special_tokens=False))
         for r in rows.to_dict("records")]
    return float(np.mean(n)) if n else 0.0
