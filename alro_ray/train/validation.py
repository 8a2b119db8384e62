"""Validation during training: NDCG@k on each worker's share of the valid split, gathered over
the workers, each epoch (`train.eval_mode`, `train.eval_users`). Worker-side (imports torch)."""

from __future__ import annotations

import ray.train
import torch
import torch.distributed as dist

from alro_ray.config import Config
from alro_ray.data.dataset import PreparedStats
from alro_ray.model.score_head import head_of, scorer_of
from alro_ray.rank.evaluation import rank_rows, ranked_relevance, summary, targets_of
from alro_ray.rank.ranking import refuse_nonfinite


def shard_rows(split: str) -> list[dict]:
    """The rows of the Ray Train dataset `split` as this worker sees it (a train share,
    `shares.share_name(rank)`: this worker's rows; valid: all of them)."""
    return [r for b in ray.train.get_dataset_shard(split).iter_batches(batch_size=256, batch_format="pandas")
            for r in b.to_dict("records")]


def in_row_order(rows: list[dict]) -> list[dict]:
    """Rows sorted by (user, window): Ray Data reads a split's blocks in no fixed order, and a
    run's shares, caps and cached-state keys must not depend on it."""
    return sorted(rows, key=lambda r: (str(r["user"]), int(r["window"])))


def valid_rows(cfg: Config, stats: PreparedStats, rank: int, world: int) -> list[dict]:
    """This worker's share of the valid rows validation scores (`train.eval_users` caps them):
    the same rows every run."""
    if not stats.rows["valid"]:
        return []
    rows = in_row_order(shard_rows("valid"))
    rows = rows[: cfg.train.eval_users] if cfg.train.eval_users else rows
    return rows[rank::world]


def validate(model, cfg: Config, stats: PreparedStats, rank_tok, pad_id: int, rank: int, world: int,
             cached=None) -> dict:
    """NDCG (and the top-N protocol's metrics) on this worker's share of the valid split, gathered
    over all workers. `cached`: that
    share's states read by the frozen model (train/frozen.py), ranked by the head alone."""
    rows = cached.rows if cached is not None else valid_rows(cfg, stats, rank, world)
    mine: list[tuple[list[float], list[float]]] = []  # per list: ranked relevance, targets
    if rows:
        model.eval()
        with torch.no_grad():
            if cached is not None:
                scores = cached.scores(head_of(model))
                refuse_nonfinite(scores, "score")
                orders = torch.argsort(scores, dim=-1, descending=True, stable=True).tolist()
            else:
                orders = rank_rows(model, rows, rank_tok.identifier_ids, pad_id, cfg.train.eval_mode,
                                   scorer=scorer_of(model, rank_tok))
        model.train()
        mine = list(zip(ranked_relevance(rows, orders), map(targets_of, rows)))
    gathered = [None] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    ranked, targets = zip(*[r for part in gathered for r in part]) if any(gathered) else ((), ())
    metrics = summary(ranked, targets, stats.protocol)
    return {f"valid_{k}": v for k, v in metrics.items() if k not in ("lists", "lists_undefined") and v is not None}
