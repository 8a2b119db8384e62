"""`alro prepare` on the top-N protocol at growing numbers of users: time per stage and peak memory.

    python bench/topn_scale.py [--users 10000,100000] [--items 10000] [--json FILE] [--quick]

For each size a synthetic log is written as Parquet in chunks of users (pyarrow; no Python list of
all rows): users with a Zipf-like activity of 20..200 ratings (Pareto, capped), items drawn with a
popularity skew, ratings 1..5 from an item and a user bias, increasing timestamps per user; plus
an items table (item_id, title). Then `alro prepare` runs on it in a subprocess of its own
(`data.dataset=table data.protocol=topn`, H 10, holdout 10, C 20, one training window per user, EASE
with one λ, 2 retrieval folds (`--folds`; each one more is one more EASE fit, the config's default
is 5), `model.name=tiny-random` so that tokenizing is cheap), with:

  time per stage   the subprocess wraps the pipeline's stages (reading, cleaning, the protocol's
                   frames, the retriever fits, each Ray Data execution, the writes) with timers;
                   "other" is the rest of the wall time (the tokenizer, Ray's start, stats)
  driver peak RSS  ru_maxrss of the subprocess (os.wait4), and at the end of each stage, so the
                   stage that set the peak shows
  tree peak PSS    the proportional set size summed over the subprocess and every process under it
                   (the Ray workers, the raylet with the object store's pages), sampled each second
  CPU seconds      user + system time summed over the same processes (sampled with them): on a
                   machine shared with other jobs it moves less than the wall time

Sizes run one after another in one invocation, and the table sets them side by side with the
ratio of the largest to the smallest. `--quick` runs 1,000 and 3,000 users x 1,000 items (a
couple of minutes on a quiet machine). Logs go to `--work DIR/<users>/prepare.log`; a synthetic
log is reused when its Parquet files are there (`--regenerate` writes them again);
`--limit-minutes M` stops a size that runs longer and reports the stages it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH-RESULT "
STAGE_MARK = "BENCH-STAGE "  # one line per finished stage, so a run stopped half-way still tells where
CHUNK_USERS = 5_000  # users generated (and written as one row group) at a time

# (module, attribute, stage label): what the subprocess times. A missing name is skipped, so the
# bench keeps working when the pipeline is reorganised (the stage then counts as "other").
STAGES = [
    ("alro_ray.data.prepare", "read_source", "read the table"),
    ("alro_ray.data.prepare", "clean_interactions", "clean (titles, repeats)"),
    ("alro_ray.data.retrieval", "mark_roles", "mark roles (sort, windows)"),
    ("alro_ray.data.retrieval", "fit_masks", "fit masks (test, valid, folds)"),
    ("alro_ray.data.retrieval", "fit_frame", "fit frames (one per fit)"),
    ("alro_ray.data.retrieval", "sample_users", "user sampling"),
    ("alro_ray.data.retrieval", "choose", "choose the retriever (valid fits)"),
    ("alro_ray.data.retrieval", "fit_retrievers", "fit the retrievers (test, valid, folds)"),
    ("alro_ray.data.retrieval", "list_stats", "list stats"),
]
FIT = "  of which: retriever fits"  # inside "choose" and "fit the retrievers"
MATERIALIZE = ["windows (per user, Ray Data)", "retrieve (actor pool)", "drop empty training lists",
               "render + tokenize (actor pool)"]


# ---------------------------------------------------------------------------------------------
# The synthetic log.


def write_log(directory: Path, users: int, items: int, seed: int) -> dict:
    """interactions.parquet and items.parquet in `directory`, written CHUNK_USERS users at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    cdf = np.cumsum(popularity / popularity.sum())
    quality = rng.normal(0.0, 0.8, items)
    item_ids = np.array([f"i{j}" for j in range(items)], dtype=object)
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.int8()),
                        ("timestamp", pa.int64())])
    rows = 0
    t = time.perf_counter()
    with pq.ParquetWriter(directory / "interactions.parquet", schema) as writer:
        for start in range(0, users, CHUNK_USERS):
            n = min(CHUNK_USERS, users - start)
            # Pareto(α = 1.2, from 20), capped at 200 ratings (and at the catalogue's size)
            want = np.minimum(np.minimum(200, items), np.floor(20 * (1 - rng.random(n)) ** (-1 / 1.2))).astype(np.int64)
            draws = 2 * want + 20
            user = np.repeat(np.arange(n), draws)
            item = np.minimum(np.searchsorted(cdf, rng.random(len(user))), items - 1)
            key = np.unique(user * items + item)  # distinct (user, item), sorted
            user, item = key // items, key % items
            order = np.lexsort((rng.random(len(key)), user))  # a random order inside each user
            user, item = user[order], item[order]
            first = np.searchsorted(user, np.arange(n))
            keep = np.arange(len(user)) - first[user] < want[user]
            user, item = user[keep], item[keep]
            count = np.bincount(user, minlength=n)
            gaps = rng.integers(60, 3 * 86_400, len(user))
            start_time = 1_000_000_000 + rng.integers(0, 300 * 86_400, n)
            ends = np.cumsum(gaps)
            first = np.concatenate([[0], np.cumsum(count)[:-1]])
            stamps = start_time[user] + ends - (ends[first] - gaps[first])[user]  # increasing per user
            rating = np.clip(np.rint(3.6 + quality[item] + rng.normal(0, 0.5, n)[user] + rng.normal(0, 0.9, len(user))),
                             1, 5).astype(np.int8)
            names = np.char.add("u", (start + np.arange(n)).astype(str)).astype(object)
            writer.write_table(pa.table({"user_id": pa.array(names[user], pa.string()),
                                         "item_id": pa.array(item_ids[item], pa.string()),
                                         "rating": rating, "timestamp": stamps}, schema=schema))
            rows += len(user)
    pq.write_table(pa.table({"item_id": pa.array(item_ids, pa.string()),
                             "title": pa.array([f"Item {j}" for j in range(items)], pa.string())}),
                   directory / "items.parquet")
    info = {"users": users, "items": items, "rows": rows, "seconds": round(time.perf_counter() - t, 1),
            "mb": round((directory / "interactions.parquet").stat().st_size / 2**20, 1)}
    (directory / "log.json").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------
# The subprocess: one timed `alro prepare`.


def worker(args: argparse.Namespace) -> None:
    import importlib
    import logging

    import psutil

    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    me = psutil.Process()
    stages: list[dict] = []
    depth = [0]

    def timed(label, fn):
        def wrapper(*a, **k):
            outer = depth[0] == 0
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                stages.append({"stage": label, "seconds": time.perf_counter() - t, "outer": outer,
                               "rss_gb": me.memory_info().rss / 2**30,
                               "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
                print(STAGE_MARK + json.dumps(stages[-1]), flush=True)
        return wrapper

    for module, name, label in STAGES:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            setattr(mod, name, timed(label, getattr(mod, name)))
    from alro_ray.classical import retrievers

    retrievers.Retriever.fit = timed(FIT, retrievers.Retriever.fit)
    import ray
    import ray.data

    names = iter(MATERIALIZE)
    materialize = ray.data.Dataset.materialize
    ray.data.Dataset.materialize = lambda self, *a, **k: timed(next(names, "materialize, other"), materialize)(self, *a, **k)
    for method, label in (("write_parquet", "write the splits"), ("to_pandas", "to_pandas (to the driver)"),
                          ("count", "count rows")):
        setattr(ray.data.Dataset, method, timed(label, getattr(ray.data.Dataset, method)))
    ray.put = timed("ray.put (retrievers; Ray Data's from_pandas)", ray.put)

    from alro_ray.cli import main as alro

    t = time.perf_counter()
    rc = alro(["prepare", "--out", args.out, *args.overrides])
    seconds = time.perf_counter() - t
    stats = json.loads((Path(args.out) / "stats.json").read_text()) if rc == 0 else {}
    print(MARK + json.dumps({"rc": rc, "seconds": seconds, "stages": stages, "rows": stats.get("rows"),
                             "interactions": stats.get("interactions_read"),
                             "recall": stats.get("candidate_recall")}), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: run, sample memory, tabulate.


def tree_sample(pid: int, cpu: dict[int, float]) -> float:
    """GiB: PSS summed over `pid` and its descendants (0 for a process gone meanwhile); `cpu` gets
    each one's CPU seconds so far (user + system)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
            times = p.cpu_times()
            cpu[p.pid] = max(cpu.get(p.pid, 0.0), times.user + times.system)
        except psutil.Error:
            pass
    return total / 2**30


def run_prepare(data_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    overrides = ["data.dataset=table", f"data.data_dir={data_dir}", "data.protocol=topn", "data.history=10",
                 "data.holdout=10", "data.candidates=20", "data.windows_per_user=1",
                 "data.retrieval.retrievers=[ease]", f"data.retrieval.ease_reg=[{args.ease_reg:g}]",
                 f"data.retrieval.folds={args.folds}", f"data.tokenize_actors={args.actors}",
                 "model.name=tiny-random", *args.set]
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--", *overrides]
    log = out.parent / "prepare.log"
    peak, cpu = {"pss": 0.0}, {}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env=dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1"))
        done, stopped = threading.Event(), threading.Event()
        started = time.perf_counter()

        def sample():
            while not done.wait(1.0):
                peak["pss"] = max(peak["pss"], tree_sample(proc.pid, cpu))
                if args.limit_minutes and time.perf_counter() - started > 60 * args.limit_minutes \
                        and not stopped.is_set():
                    stopped.set()  # the run's own session: its Ray processes go with it
                    os.killpg(proc.pid, signal.SIGTERM)
                    threading.Timer(30, lambda: _kill_group(proc.pid)).start()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    result = next((json.loads(line[len(MARK):]) for line in text.splitlines() if line.startswith(MARK)), None)
    if proc.returncode != 0 or result is None or result["rc"] != 0:
        sys.stderr.write(text[-4000:])
        why = f"stopped after {args.limit_minutes:g} min" if stopped.is_set() else f"exit {proc.returncode}"
        stages = [json.loads(line[len(STAGE_MARK):]) for line in text.splitlines() if line.startswith(STAGE_MARK)]
        return {"failed": f"{why}; see {log}", "wall": wall, "stages": stages,
                "driver_peak_gb": usage.ru_maxrss / 2**20, "tree_peak_pss_gb": peak["pss"]}
    spilled = [line.strip() for line in text.splitlines() if "Spilled" in line]
    return {**result, "wall": wall, "cpu": sum(cpu.values()),
            "driver_peak_gb": usage.ru_maxrss / 2**20, "tree_peak_pss_gb": peak["pss"],
            "spilled": spilled[-1] if spilled else None, "log": str(log)}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stage_table(results: dict[int, dict]) -> list[tuple[str, list]]:
    """(label, [seconds per size]) for the outermost stages (and the retriever fits inside them),
    summed by label, in first-seen order; then "other": the wall time no stage accounts for."""
    labels: list[str] = []
    for r in results.values():
        for s in r.get("stages", []):
            if s["outer"] and s["stage"] not in labels:
                labels.append(s["stage"])
    labels += [FIT] * any(s["stage"] == FIT for r in results.values() for s in r.get("stages", []))
    rows = [(label, [sum(s["seconds"] for s in r.get("stages", []) if s["stage"] == label
                         and (s["outer"] or label == FIT)) for r in results.values()]) for label in labels]
    rows.append(("other (imports, Ray's start, the tokenizer, stats)",
                 [r["wall"] - sum(s["seconds"] for s in r.get("stages", []) if s["outer"]) for r in results.values()]))
    return rows


def fits(r: dict) -> str:
    """How many retriever fits ran and the mean seconds of one."""
    times = [s["seconds"] for s in r.get("stages", []) if s["stage"] == FIT]
    return f"{len(times)} x {sum(times) / len(times):.1f} s" if times else "-"


def after_reading(r: dict) -> float | None:
    """GiB: the driver's RSS when the table had been read (the log as a frame, and the reader's leftovers)."""
    return next((s["rss_gb"] for s in r.get("stages", []) if s["stage"] == STAGES[0][2]), None)


def peak_stage(r: dict) -> str:
    """The outer stage at whose end the driver's ru_maxrss had first reached its final value."""
    outer = [s for s in r.get("stages", []) if s["outer"]]
    if not outer:
        return "-"
    top = max(s["peak_gb"] for s in outer)
    return next(s["stage"] for s in outer if s["peak_gb"] >= top - 1e-3)


def report(results: dict[int, dict], logs: dict[int, dict]) -> str:
    sizes = list(results)
    first, last = sizes[0], sizes[-1]
    ratio = len(sizes) > 1 and "failed" not in results[first] and "failed" not in results[last]
    head = "| | " + " | ".join(f"{u:,} users" for u in sizes) + (f" | {last // first}x users: ratio |" if ratio else " |")
    lines = [head, "| --- |" + " ---: |" * (len(sizes) + ratio)]

    def row(label, values, fmt, show_ratio=True):
        cells = [fmt(v) if v is not None else "-" for v in values]
        extra = ""
        if ratio:
            a, b = values[0], values[-1]
            extra = f" {b / a:.1f}x |" if show_ratio and a and b is not None else " |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + extra)

    row("interactions", [logs[u]["rows"] for u in sizes], lambda v: f"{v:,}")
    row("lists (train/valid/test)", [None if "failed" in results[u] else "/".join(str(results[u]["rows"][s])
        for s in ("train", "valid", "test")) for u in sizes], str, False)
    for label, values in stage_table(results):
        row(label.strip(), values, lambda v: f"{v:.1f}")
    row("retriever fits: count x mean", [fits(results[u]) for u in sizes], str, False)
    row("wall seconds (subprocess)", [results[u]["wall"] for u in sizes], lambda v: f"{v:.1f}")
    row("ms per user", [1000 * results[u]["wall"] / u for u in sizes], lambda v: f"{v:.2f}")
    row("CPU seconds, process tree (sampled each second)", [results[u].get("cpu") for u in sizes],
        lambda v: f"{v:.1f}")
    row("driver RSS after reading, GiB", [after_reading(results[u]) for u in sizes], lambda v: f"{v:.2f}")
    row("driver peak RSS, GiB", [results[u]["driver_peak_gb"] for u in sizes], lambda v: f"{v:.2f}")
    row("driver peak reached in", [peak_stage(results[u]) for u in sizes], str, False)
    row("process tree peak PSS, GiB", [results[u]["tree_peak_pss_gb"] for u in sizes], lambda v: f"{v:.2f}")
    for u in sizes:
        if "failed" in results[u]:
            lines.append(f"\n{u:,} users: failed ({results[u]['failed']})")
        elif results[u].get("spilled"):
            lines.append(f"\n{u:,} users, object store: {results[u]['spilled']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="10000,100000", help="comma-separated sizes, smallest first")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--quick", action="store_true", help="1,000 and 3,000 users x 1,000 items")
    p.add_argument("--folds", type=int, default=2,
                   help="data.retrieval.folds (the config's default is 5; each fold is one more EASE fit)")
    p.add_argument("--ease-reg", type=float, default=200.0)
    p.add_argument("--actors", type=int, default=1, help="data.tokenize_actors (also the retrieval actors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-minutes", type=float, default=None,
                   help="stop a size that runs longer (its stages so far are still reported)")
    p.add_argument("--work", default=None, help="where logs and prepared data go (default: a temporary directory)")
    p.add_argument("--regenerate", action="store_true", help="write the logs again even if present")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.users, args.items = "1000,3000", 1000
    sizes = sorted(int(u) for u in args.users.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-topn-scale-")).resolve()
    results, logs = {}, {}
    for users in sizes:
        data = work / f"log-{users}x{args.items}-s{args.seed}"
        if args.regenerate or not (data / "log.json").is_file():
            logs[users] = write_log(data, users, args.items, args.seed)
        else:
            logs[users] = json.loads((data / "log.json").read_text())
        print(f"log {users:,} users x {args.items:,} items: {logs[users]['rows']:,} ratings, "
              f"{logs[users]['mb']} MB of Parquet", file=sys.stderr, flush=True)
        out = work / str(users) / "data"
        out.parent.mkdir(parents=True, exist_ok=True)
        results[users] = run_prepare(data, out, args)
        r = results[users]
        print(f"  prepare: {r['wall']:.1f} s, driver peak {r['driver_peak_gb']:.2f} GiB, tree peak PSS "
              f"{r['tree_peak_pss_gb']:.2f} GiB" + (f" FAILED {r['failed']}" if "failed" in r else ""),
              file=sys.stderr, flush=True)
    load = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"items": args.items, "folds": args.folds, "logs": logs,
                                               "results": results, "loadavg": load}, indent=1))
    print(f"\ntopn_scale: {args.items:,} items, folds {args.folds}, EASE λ={args.ease_reg:g}, "
          f"{args.actors} actor(s); load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print(report(results, logs))


if __name__ == "__main__":
    main()
