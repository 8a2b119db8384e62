"""Each training worker's share of the train split: cut once on the driver, the same every run.

Ray Data's streaming split hands blocks to whichever worker asks first, so which rows a worker
trained on, and in what order, changed from run to run: a seeded LoRA run did not repeat. The
driver now reads the split itself and gives worker `rank` every `world`-th row by (user, window)
(the order of `validation.in_row_order`), as its own dataset `share_name(rank)`, in an order drawn
from a hash of (user, window); the worker shuffles it locally each epoch with a seeded buffer
(trainer.train_epoch). The frozen-LM path reads the same share and sorts it (frozen.py).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from alro_ray.data.dataset import read_split_table
from alro_ray.data.samples import stable_hash

BLOCK_ROWS = 1024  # rows per row group of a share's file


def share_name(rank: int) -> str:
    """The Ray Train dataset that holds worker `rank`'s share of the train split."""
    return f"train_{rank}"


def split_shares(table: pa.Table, world: int) -> list[pa.Table]:
    """`world` tables, one per worker: rank r gets rows r, r + world, ... in (user, window) order,
    each share shuffled by a hash of its rows' (user, window). A pure function of the rows, not of
    their order in `table`; share sizes differ by at most one."""
    users = [str(u) for u in table.column("user").to_pylist()]
    windows = [int(w) for w in table.column("window").to_pylist()]
    by_row = sorted(range(table.num_rows), key=lambda i: (users[i], windows[i]))
    shares = []
    for rank in range(world):
        mine = sorted(by_row[rank::world], key=lambda i: (stable_hash(f"{users[i]}/{windows[i]}"), users[i], windows[i]))
        shares.append(table.take(pa.array(mine, type=pa.int64())))
    return shares


def share_datasets(data_dir: str | Path, world: int, out: Path) -> dict:
    """{share_name(rank): that worker's rows as a materialized Ray dataset}: cut on the driver,
    written to `out/<share_name>.parquet` and read back in file order by tasks that reserve no CPU
    (under Tune other trials' workers may hold every CPU; `from_arrow` would start 1-CPU tasks)."""
    import pyarrow.parquet as pq
    import ray.data

    out.mkdir(parents=True, exist_ok=True)
    datasets = {}
    for rank, share in enumerate(split_shares(read_split_table(data_dir, "train"), world)):
        path = out / f"{share_name(rank)}.parquet"
        pq.write_table(share, path, row_group_size=BLOCK_ROWS)
        ds = ray.data.read_parquet(str(path), num_cpus=0)
        ds.context.execution_options.preserve_order = True  # the file's order, whatever the read tasks' timing
        datasets[share_name(rank)] = ds.materialize()
    return datasets


def ordered_ingest():
    """Ray Train's default ingest options with the blocks' order kept: without it Ray Data's
    threads may hand a worker its batches in another order each run, and a seeded run would not
    repeat. Built here rather than from `DataConfig.default_ingest_options()`, which passes the
    deprecated `exclude_resources` and prints Ray's deprecation warning in every run."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)
