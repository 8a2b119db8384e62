"""Scoring prepared rows: rank them with a model or a baseline, then NDCG (spec §5).

The functions here work on one process's rows; the training loop calls them on each worker's
share of the validation split, and the evaluation job on each actor's batch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from alro_ray.errors import NonFiniteError
from alro_ray.rank.metrics import mean_ndcg
from alro_ray.rank.ranking import rank_batch

KS = (3, 10, 25)


def prompt_ids(row) -> list[int]:
    """The prompt of a prepared row: everything before the first identifier of the response."""
    return [int(x) for x in row["input_ids"][: int(row["slot_positions"][0])]]


def rank_rows(model, rows: Sequence, identifier_ids: Sequence[int], pad_id: int, mode: str,
              batch_size: int = 4) -> list[list[int]]:
    """Predicted orders (prompt positions best first) of prepared rows."""
    orders: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        try:
            batch_orders, _ = rank_batch(model, [prompt_ids(r) for r in chunk], identifier_ids, mode, pad_id)
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


def ndcg_summary(relevance_lists: list[list[float]], ks: Sequence[int] = KS) -> dict:
    return mean_ndcg(relevance_lists, ks=tuple(ks))


def rows_of(frame) -> list[dict]:
    """DataFrame or column dict -> list of row dicts (the form the functions above take)."""
    if hasattr(frame, "to_dict"):
        return frame.to_dict("records")
    n = len(next(iter(frame.values())))
    return [{k: v[i] for k, v in frame.items()} for i in range(n)]


def heldout_summary(final_dir, data_dir, mode: str, baselines=("random", "popularity", "item-mean"),
                    split: str = "test", seed: int = 0) -> dict[str, dict]:
    """NDCG of a trained ranker and of simple baselines on the same held-out candidate lists."""
    import time

    from alro_ray.rank.baselines import evaluate_baselines
    from alro_ray.model.checkpoint import load_ranker
    from alro_ray.data.prepare import read_split

    rows = rows_of(read_split(data_dir, split))
    table = evaluate_baselines(data_dir, baselines, split, seed)
    ranker = load_ranker(final_dir)
    t0 = time.time()
    orders = rank_rows(ranker.model, rows, ranker.rank_tokenizer.identifier_ids, ranker.tokenizer.pad_token_id, mode)
    table[f"ALRO ({mode})"] = {**ndcg_summary(ranked_relevance(rows, orders)),
                               "tpq_seconds": (time.time() - t0) / max(1, len(rows))}
    return table


def format_table(table: dict[str, dict], ks=KS) -> str:
    head = "| method | " + " | ".join(f"NDCG@{k}" for k in ks) + " | lists |"
    lines = [head, "|" + " --- |" * (len(ks) + 2)]
    for name, m in table.items():
        cells = [f"{m[f'ndcg@{k}']:.4f}" if m.get(f"ndcg@{k}") is not None else "-" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m.get('lists', '-')} |")
    return "\n".join(lines)
