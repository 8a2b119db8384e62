"""Length-bucketed micro-batches: rows of similar token count share a micro-batch.

Training sequences are left-padded to the longest row of their micro-batch, so a micro-batch
that mixes a 450- and a 700-token prompt computes 250 positions of padding. The worker reads
its shard in blocks of `micro_batch * bucket` rows (already shuffled by Ray Data's local
shuffle), sorts each block by length, cuts it into micro-batches and yields those in a seeded
random order, so an epoch still mixes lengths across steps. bucket 1 (or micro_batch 1) keeps
the shuffled order unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def bucketed(blocks: Iterable[dict], micro_batch: int, bucket: int, seed: int) -> Iterator[dict]:
    """Micro-batches (column -> array, at most `micro_batch` rows) from `blocks` (column -> array,
    as `iter_batches(batch_format="numpy")` gives them). Every row comes out exactly once."""
    rng = np.random.default_rng(seed)
    for block in blocks:
        n = len(block["input_ids"])
        if bucket <= 1 or micro_batch <= 1:
            order, starts = np.arange(n), range(0, n, micro_batch)
        else:
            order = np.argsort([len(x) for x in block["input_ids"]], kind="stable")
            starts = rng.permutation(range(0, n, micro_batch))
        for s in starts:
            idx = order[s:s + micro_batch]
            yield {k: v[idx] for k, v in block.items()}


def padding_share(micro_batches: Iterable[dict]) -> float:
    """Share of the computed positions that are padding (each micro-batch padded to its longest row)."""
    real = padded = 0
    for mb in micro_batches:
        lengths = [len(x) for x in mb["input_ids"]]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0
