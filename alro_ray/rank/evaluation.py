"""Scoring prepared rows: rank them with a model or a baseline, then NDCG (spec §5).

The functions here work on one process's rows; the training loop calls them on each worker's
share of the validation split, and the evaluation job on each actor's batch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from alro_ray.errors import NonFiniteError
from alro_ray.rank.metrics import mean_metrics
from alro_ray.rank.ranking import rank_batch


def prompt_ids(row) -> list[int]:
    """The prompt of a prepared row: everything before the first identifier of the response."""
    return [int(x) for x in row["input_ids"][: int(row["slot_positions"][0])]]


def rank_rows(model, rows: Sequence, identifier_ids: Sequence[int], pad_id: int, mode: str,
              batch_size: int = 4, scorer=None) -> list[list[int]]:
    """Predicted orders (prompt positions best first) of prepared rows (`scorer`: mode score's head)."""
    orders: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        try:
            batch_orders, _ = rank_batch(model, [prompt_ids(r) for r in chunk], identifier_ids, mode, pad_id,
                                         scorer=scorer)
        except NonFiniteError as e:
            raise with_users(e, chunk) from None
        orders.extend(batch_orders)
    return orders


def with_users(error: NonFiniteError, rows: Sequence) -> NonFiniteError:
    """The ranking error naming the users of the batch it came from."""
    users = [str(r["user"]) for r in rows if "user" in r]
    shown = ", ".join(users[:10]) + (" ..." if len(users) > 10 else "")
    return NonFiniteError(f"{error} [batch of {len(rows)} rows, users: {shown or 'unknown'}]")


def ranked_relevance(rows: Sequence, orders: Iterable[Sequence[int]]) -> list[list[float]]:
    return [[float(r["candidate_ratings"][j]) for j in order] for r, order in zip(rows, orders)]


def targets_of(row) -> list[float]:
    """The ratings a list is scored against (data/dataset.py `target_ratings`): the window's
    held-out set; a row prepared before the top-N protocol has only its candidates."""
    targets = row.get("target_ratings") if hasattr(row, "get") else None
    return [float(x) for x in (targets if targets is not None else row["candidate_ratings"])]


def summary(relevance_lists: Sequence[Sequence[float]], target_lists: Sequence[Sequence[float]],
            protocol: str = "rated") -> dict:
    """The metrics of ranked lists against their targets (rank/metrics.py `mean_metrics`)."""
    return mean_metrics(relevance_lists, target_lists, protocol)
