"""Padding share of training micro-batches, unbucketed vs length-bucketed (train.bucket).

    python bench/padding.py --data PREPARED_DIR [--micro-batch 16] [--buckets 1 4 8 16]

Reads the prepared training split's token counts, shuffles them as one epoch would, and reports
the share of computed positions that are left padding for each train.bucket (no model, seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from alro_ray.train.batching import bucketed, padding_share  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared data directory (alro prepare)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ids = pq.read_table(Path(args.data) / "train", columns=["input_ids"]).column("input_ids").to_pylist()
    column = np.empty(len(ids), dtype=object)
    column[:] = [ids[i] for i in np.random.default_rng(args.seed).permutation(len(ids))]
    lengths = [len(x) for x in ids]
    print(f"{args.data}: {len(ids)} training rows, {min(lengths)}..{max(lengths)} tokens (mean "
          f"{np.mean(lengths):.0f}), micro-batch {args.micro_batch}")
    print("| train.bucket | padding share | positions computed vs bucket 1 |")
    print("| --- | --- | --- |")
    base = None
    for b in args.buckets:
        size = args.micro_batch * b
        blocks = ({"input_ids": column[s:s + size]} for s in range(0, len(column), size))
        share = padding_share(bucketed(blocks, args.micro_batch, b, args.seed))
        computed = sum(lengths) / (1 - share)
        base = base or computed
        print(f"| {b} | {share:.1%} | {computed / base:.2f} |")


if __name__ == "__main__":
    main()
