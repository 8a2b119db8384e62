"""data/per_user.py: users cut into blocks at their boundaries, then mapped one user at a time."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from alro_ray.data.per_user import map_users, user_blocks


def _log(users: list[str], counts: list[int]) -> pd.DataFrame:
    rows = [(u, i) for u, n in zip(users, counts) for i in range(n)]
    return pd.DataFrame(rows, columns=["user", "item"])


@pytest.mark.parametrize("blocks", [1, 2, 3, 8, 50])
def test_every_user_is_in_one_block_and_nothing_is_lost(blocks):
    df = _log(["a", "b", "c", "d", "e"], [1, 7, 2, 2, 8])
    parts = user_blocks(df, blocks)
    assert 1 <= len(parts) <= min(blocks, 5)
    assert pd.concat(parts).equals(df)
    owners = [set(p["user"]) for p in parts]
    assert all(not (x & y) for i, x in enumerate(owners) for y in owners[i + 1:])


def test_blocks_are_cut_by_rows_not_by_users():
    # 20 rows: with 2 blocks the cut falls where the rows reach half (before "c"), not after 2 users
    df = _log(["a", "b", "c", "d"], [9, 1, 5, 5])
    assert [sorted(set(p["user"])) for p in user_blocks(df, 2)] == [["a", "b"], ["c", "d"]]


def test_an_empty_log_is_one_empty_block():
    parts = user_blocks(_log([], []), 4)
    assert len(parts) == 1 and parts[0].empty


def test_map_users_gives_what_a_groupby_gives(ray_local):
    """prepare's own per-user stage (windows, shuffled candidates, permutations) through map_users
    against pandas' groupby on the driver: the same rows."""
    from alro_ray.data.dataset import SAMPLE_SCHEMA
    from alro_ray.data.prepare import _user_group

    rng = np.random.default_rng(0)
    df = pd.DataFrame([(f"u{u}", f"i{rng.integers(1000)}", int(rng.integers(1, 6)), int(t), "train")
                       for u in range(13) for t in range(rng.integers(11, 30))],
                      columns=["user", "item", "rating", "timestamp", "split"]).sample(frac=1, random_state=0)
    kwargs = dict(history=6, candidates=5, windows=2, permutations=1, seed=3)
    # Ray Data may hand the blocks back in any order; within a block the users keep theirs.
    got = map_users(df, _user_group, kwargs, SAMPLE_SCHEMA).to_pandas().sort_values("user", kind="stable",
                                                                                   ignore_index=True)
    want = pa.Table.from_pylist([row for _, g in df.groupby("user", sort=True) for row in _user_group(g, **kwargs)],
                                schema=SAMPLE_SCHEMA).to_pandas()
    assert set(got["user"]) == set(df["user"])
    assert len(got) == len(want) and got.to_json() == want.to_json()


def test_windows_through_map_users_are_user_windows(ray_local):
    """The top-N windows stage, its schema inferred: the same windows as user_windows per user."""
    from alro_ray.data.retrieval import _windows_of
    from alro_ray.data.topn import mark_roles, user_windows

    rng = np.random.default_rng(1)
    df = pd.DataFrame([(f"u{u}", f"i{rng.integers(500)}", int(rng.integers(1, 6)), int(t))
                       for u in range(9) for t in range(rng.integers(31, 45))],
                      columns=["user", "item", "rating", "timestamp"])
    marked = mark_roles(df, 10, 10, 1)
    kwargs = dict(history=10, folds=2, seed=0)
    got = map_users(marked, _windows_of, kwargs).to_pandas().sort_values(["user", "split"], ignore_index=True)
    want = pd.DataFrame([w for _, g in marked.groupby("user", sort=True)
                         for w in user_windows(g.sort_values("pos"), **kwargs)]).sort_values(
        ["user", "split"], ignore_index=True)
    assert len(got) == len(want) >= 9 * 2  # a test and a valid window per user, training windows where they fit
    assert got.to_json() == want.to_json()
