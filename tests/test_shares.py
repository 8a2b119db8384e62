"""The training workers' shares of the train split (train/shares.py): fixed, whatever order the rows come in."""

import random

import pyarrow as pa

from alro_ray.train.shares import split_shares


def _table(rows):
    return pa.Table.from_pylist(rows)


def test_shares_are_a_fixed_partition_in_a_hashed_order():
    rows = [{"user": str(u), "window": w, "n": 10 * u + w} for u in range(7) for w in range(2)]
    shares = split_shares(_table(rows), 3)
    got = [s.column("n").to_pylist() for s in shares]
    assert sorted(n for share in got for n in share) == sorted(r["n"] for r in rows)  # each row once
    assert [len(s) for s in got] == [5, 5, 4]
    assert sorted(got[1]) == [1, 20, 31, 50, 61]  # every third by (user, window), from the second
    assert any(share != sorted(share) for share in got)  # shuffled by the rows' hash, not sorted
    shuffled = random.Random(0).sample(rows, len(rows))
    assert [s.column("n").to_pylist() for s in split_shares(_table(shuffled), 3)] == got
    assert shares[0].schema == _table(rows).schema  # whole rows, every column


def test_one_worker_takes_every_row_and_empty_input_gives_empty_shares():
    rows = [{"user": "b", "window": 0}, {"user": "a", "window": 1}, {"user": "a", "window": 0}]
    (only,) = split_shares(_table(rows), 1)
    assert sorted(zip(only.column("user").to_pylist(), only.column("window").to_pylist())) == [("a", 0), ("a", 1), ("b", 0)]
    empty = split_shares(_table(rows).slice(0, 0), 2)
    assert [s.num_rows for s in empty] == [0, 0]
