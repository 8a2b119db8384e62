"""Time `alro prepare` (the Ray Data pipeline) on MovieLens 100K at 1 and 2 CPUs.

    python bench/prepare.py [--data-dir ../shared/data/ml-100k] [--repeats 2]

Each run is a fresh Python process with its own `ray.init(num_cpus=n)` and
`data.tokenize_actors = n`, so no run reuses another's workers or caches; the time is that of
`prepare()` alone (Ray's own start is left out), default tokenizer (smollm2-135m), paper
windows H=20, C=25. Each variant runs `--repeats` times and the best is kept.
The third variant, 2 CPUs with the per-user stage as it was before data/per_user.py (Ray Data's
groupby, hash-shuffled into 4 partitions per CPU, then map_groups), is the side-by-side reference
for the shuffle-free stage. A second table splits the best run of each variant into the pipeline's phases.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"
MARK = "BENCH-RESULT "

# name, CPUs (= tokenize actors), whether the per-user stage is Ray Data's groupby (the old stage)
VARIANTS = [
    ("1 CPU", 1, False),
    ("2 CPUs", 2, False),
    ("2 CPUs, groupby shuffle (before)", 2, True),
]


def groupby_map_users(df, fn, fn_kwargs, schema=None):
    """The per-user stage before data/per_user.py: a hash shuffle of the driver's log by user,
    then a table per user."""
    import pyarrow as pa
    import ray

    partitions = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))
    return ray.data.from_pandas(df).groupby("user", num_partitions=partitions).map_groups(
        lambda group: pa.Table.from_pylist(fn(group, **fn_kwargs), schema=schema), batch_format="pandas")


def worker(args: argparse.Namespace) -> None:
    """One timed prepare in this process; prints one JSON line after MARK."""
    import ray
    import ray.data

    from alro_ray.cluster import ensure_ray
    from alro_ray.config import load_config
    from alro_ray.data.prepare import prepare

    ensure_ray(num_cpus=args.cpus)
    if args.groupby:
        import alro_ray.data.prepare as prepare_module

        prepare_module.map_users = groupby_map_users

    # Phase times: wrap the Dataset calls prepare() makes (each one executes the plan so far).
    phases: dict[str, float] = defaultdict(float)

    depth = [0]  # only the outermost call counts (write_parquet may materialize inside)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    phases[name] += time.perf_counter() - t
        return wrapper

    ds_cls = ray.data.Dataset
    materialize = ds_cls.materialize
    stages = iter(["per-user samples", "render + tokenize (actor pool)"])

    def materialize_stage(self, *a, **k):
        return timed(next(stages, "materialize, other"), materialize)(self, *a, **k)

    ds_cls.materialize = materialize_stage
    ds_cls.write_parquet = timed("filter + write, per split", ds_cls.write_parquet)
    ds_cls.to_pandas = timed("filter + count, per split", ds_cls.to_pandas)

    cfg = load_config(None, ["data.dataset=movielens-100k", f"data.data_dir={args.data_dir}",
                             "data.history=20", "data.candidates=25",
                             f"data.tokenize_actors={args.cpus}"])
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as out:
        t = time.perf_counter()
        stats = prepare(cfg, out)
        seconds = time.perf_counter() - t
        files_written = [len(list((Path(out) / s).glob("*.parquet"))) for s in ("train", "valid", "test")]
    phases["everything else (driver)"] = seconds - sum(phases.values())
    print(MARK + json.dumps({"seconds": seconds, "rows": sum(stats.rows.values()),
                             "files": files_written, "phases": dict(phases)}), flush=True)
    ray.shutdown()


def run_one(data_dir: str, cpus: int, groupby: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--cpus", str(cpus), "--data-dir", data_dir]
    if groupby:
        cmd += ["--groupby"]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f"run with {cpus} CPU(s) failed (exit {proc.returncode})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="MovieLens 100K directory (u.data, u.item)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant; the best is kept")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--groupby", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.worker:
        worker(args)
        return
    if not (Path(args.data_dir) / "u.data").is_file():
        raise SystemExit(f"MovieLens 100K not found at {args.data_dir} (--data-dir)")

    variants = list(VARIANTS)
    best = {}
    for name, cpus, groupby in variants:
        runs = []
        for r in range(args.repeats):
            res = run_one(args.data_dir, cpus, groupby)
            print(f"  {name}: run {r + 1}: {res['seconds']:.1f} s", file=sys.stderr, flush=True)
            runs.append(res)
        best[name] = min(runs, key=lambda x: x["seconds"])

    base = best[variants[0][0]]["seconds"]
    print(f"\nprepare, MovieLens 100K, H=20 C=25, smollm2-135m tokenizer, best of {args.repeats}\n")
    print("| variant | seconds | rows/s | vs 1 CPU | Parquet files (train/valid/test) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, res in best.items():
        print(f"| {name} | {res['seconds']:.1f} | {res['rows'] / res['seconds']:.1f} "
              f"| {base / res['seconds']:.2f}x | {'/'.join(map(str, res['files']))} |")
    names = list(best)
    print("\nphases of the best run (seconds)\n")
    print("| phase | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for phase in best[names[0]]["phases"]:
        print(f"| {phase} | " + " | ".join(f"{best[n]['phases'].get(phase, 0.0):.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
