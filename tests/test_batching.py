"""Length-bucketed micro-batches (train/batching.py): nothing lost, less padding, seeded."""

import numpy as np

from alro_ray.train.batching import bucketed, padding_share


def _blocks(lengths, block):
    rng = np.random.default_rng(1)
    ids = np.empty(len(lengths), dtype=object)
    ids[:] = [list(range(n)) for n in lengths]
    users = np.array([f"u{i}" for i in range(len(lengths))])
    perm = rng.permutation(len(lengths))
    ids, users = ids[perm], users[perm]
    return [{"input_ids": ids[s:s + block], "user": users[s:s + block]} for s in range(0, len(lengths), block)]


def test_every_row_once_in_micro_batches_of_similar_length():
    lengths = list(np.random.default_rng(0).integers(400, 800, size=203))
    out = list(bucketed(_blocks(lengths, 16 * 8), micro_batch=16, bucket=8, seed=0))
    users = [u for mb in out for u in mb["user"]]
    assert sorted(users) == sorted(f"u{i}" for i in range(203))  # 203 rows in, 203 out, once each
    assert all(len(mb["user"]) <= 16 for mb in out) and len(out) == -(-203 // 16)
    plain = list(bucketed(_blocks(lengths, 16), micro_batch=16, bucket=1, seed=0))
    assert padding_share(plain) > 0.15  # random lengths 400..800: ~20% of positions are padding
    assert padding_share(out) < padding_share(plain) / 4


def test_bucketing_is_seeded_and_bucket_one_keeps_the_order():
    lengths = list(np.random.default_rng(0).integers(10, 100, size=50))
    def users(seed, bucket):
        return [list(mb["user"]) for mb in bucketed(_blocks(lengths, 4 * max(bucket, 1)), 4, bucket, seed)]
    assert users(0, 4) == users(0, 4) and users(0, 4) != users(1, 4)
    flat = [u for mb in users(0, 1) for u in mb]
    assert flat == [u for b in _blocks(lengths, 4) for u in b["user"]]


def test_padding_share_worked_example():
    mbs = [{"input_ids": [[1] * 3, [1] * 5]}, {"input_ids": [[1] * 4]}]
    assert padding_share(mbs) == 1 - 12 / 14  # 3 + 5 + 4 real of 5 + 5 + 4 computed
