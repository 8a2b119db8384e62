"""Length-bucketed micro-batches (train/batching.py): nothing lost, less padding, seeded."""

import numpy as np
import torch

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


def _train_rows(n, c=3, k=2):
    """Rows with the columns `collate` reads; the permutation k of row i is shown as i*10 + k."""
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        length = int(rng.integers(8, 40))
        rows.append({
            "user": f"u{i}", "input_ids": list(range(length)), "prefix_len": 2,
            "slot_positions": [length - 4, length - 3, length - 2], "candidate_ratings": [5.0, 3.0, 1.0],
            "gold_order": [0, 1, 2], "perm_orders": [[2, 1, 0], [1, 0, 2]][:k],
            "perm_input_ids": [[i * 10 + j] * length for j in range(k)],
            "perm_slot_positions": [[length - 4, length - 3, length - 2]] * k,
        })
    return rows


def test_ray_data_collates_every_row_once_into_train_batches(ray_local):
    """`MicroBatchCollate` as the collate_fn of a real `iter_torch_batches`: TrainBatches of at
    most micro_batch rows, each row once, the epoch's stored permutation picked, seeded order."""
    from alro_ray.train.batching import MicroBatchCollate
    from alro_ray.train.objective import TrainBatch

    ds = ray_local.data.from_items(_train_rows(21))

    def epoch(perm_index, seed=0):
        it = ds.iterator().iter_torch_batches(batch_size=8, collate_fn=MicroBatchCollate(2, 4, seed, perm_index))
        return [b for block in it for b in block]

    out = epoch(perm_index=1)
    assert all(isinstance(b, TrainBatch) and 1 <= b.size <= 2 for b in out)
    assert sorted(u for b in out for u in b.users) == sorted(f"u{i}" for i in range(21))
    for b in out:  # permutation 1 of 2 (epoch 1): perm_input_ids were filled with i*10 + 1
        assert [s[0] % 10 for s in b.perm_input_ids] == [1] * b.size
        assert b.perm_order.tolist() == [[1, 0, 2]] * b.size and b.slot_positions.dtype == torch.long
        assert b.without_permutation().perm_input_ids is None and b.perm_input_ids is not None
    assert [b.users for b in epoch(1)] == [b.users for b in out]  # same seed, same order
    assert all(b.perm_input_ids is None for b in epoch(None))  # no permuted pass: none collated
