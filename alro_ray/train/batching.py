"""Training micro-batches: length-bucketed, and collated inside Ray Data.

Length buckets: training sequences are left-padded to the longest row of their micro-batch, so a
micro-batch that mixes a 450- and a 700-token prompt computes 250 positions of padding. The
worker reads its shard in blocks of `micro_batch * bucket` rows (already shuffled by Ray Data's
local shuffle), sorts each block by length, cuts it into micro-batches and puts those in a seeded
random order, so an epoch still mixes lengths across steps. bucket 1 (or micro_batch 1) keeps the
shuffled order unchanged.

Collation: `MicroBatchCollate` is the `collate_fn` of `iter_torch_batches`, so a block is cut and
turned into `TrainBatch`es (tensors of slots, ratings, gold orders, permutations) in Ray Data's
prefetch thread while the previous step computes, not in the training loop.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from alro_ray.data.samples import stable_hash
from alro_ray.train.objective import TrainBatch, collate


def block_rng(block: dict, seed: int) -> np.random.Generator:
    """Seeded by the block's rows (users, else lengths), not by how many blocks came before: the
    collate_fn may run in a thread pool, so call order is no seed."""
    key = block["user"] if "user" in block else [len(x) for x in block["input_ids"]]
    return np.random.default_rng([seed, stable_hash("\n".join(str(k) for k in key))])


def micro_batches(block: dict, micro_batch: int, bucket: int, seed: int) -> Iterator[dict]:
    """The micro-batches (column -> array, at most `micro_batch` rows) of one block (column ->
    array, as `iter_batches(batch_format="numpy")` gives it). Every row comes out exactly once."""
    n = len(block["input_ids"])
    if bucket <= 1 or micro_batch <= 1:
        order, starts = np.arange(n), range(0, n, micro_batch)
    else:
        order = np.argsort([len(x) for x in block["input_ids"]], kind="stable")
        starts = block_rng(block, seed).permutation(range(0, n, micro_batch))
    for s in starts:
        idx = order[s:s + micro_batch]
        yield {k: v[idx] for k, v in block.items()}


def bucketed(blocks: Iterable[dict], micro_batch: int, bucket: int, seed: int) -> Iterator[dict]:
    """`micro_batches` of every block in turn."""
    for block in blocks:
        yield from micro_batches(block, micro_batch, bucket, seed)


class MicroBatchCollate(NumpyBatchCollateFn):
    """`iter_torch_batches(collate_fn=...)`: a block -> its micro-batches as `TrainBatch`es.

    `perm_index` (the epoch) picks each row's stored permutation when the objective has a permuted
    pass (None: none); a step that skips it (`loss.permutation_rate`) drops it with
    `TrainBatch.without_permutation`. A list of TrainBatches is no tensor batch to Ray Data, so it
    is handed over as it is (tensors stay on the CPU; the forward moves them).
    """

    def __init__(self, micro_batch: int, bucket: int, seed: int, perm_index: int | None):
        super().__init__()
        self.micro_batch, self.bucket, self.seed, self.perm_index = micro_batch, bucket, seed, perm_index

    def __call__(self, block: dict) -> list[TrainBatch]:
        return [collate(mb, self.perm_index) for mb in micro_batches(block, self.micro_batch, self.bucket, self.seed)]


def padding_share(micro_batches: Iterable[dict]) -> float:
    """Share of the computed positions that are padding (each micro-batch padded to its longest row)."""
    real = padded = 0
    for mb in micro_batches:
        lengths = [len(x) for x in mb["input_ids"]]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0
