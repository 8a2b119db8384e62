"""Serving benchmark: requests/s and p50/p99 latency at 1, 8 and 32 concurrent HTTP clients,
with dynamic batching on and off, for the Serve app of `alro_ray.serve.app`.

    python bench/serve.py                      # smollm2-135m, untrained LoRA adapter, ~4 min on 2 CPUs
    python bench/serve.py --model tiny-random  # quick run (~2 min, most of it Ray and Serve start-up)
    python bench/serve.py --model tiny-random --fault kill-ranker   # SIGKILL the ranker mid-load

--fault kill-ranker: 32 clients send 3,000 requests (batching on, one ranker replica); after a
third of them have been answered the ranker replica's process (its pid from GET /stats) gets
SIGKILL. Prints requests ok/failed, p50/p99 before the kill and from it on, and the time to
recover (until GET /stats answers from a new replica). `--retry-attempts 0` turns the ingress's
retry off, to see what it saves.

A fresh untrained checkpoint is written to a temp dir (no training needed: speed does not depend
on the adapter's values). Ray runs locally and all traffic goes to 127.0.0.1; every level sends a
fixed number of requests (bounded). Prints one row per (batching, clients) and the on/off ratios;
--out FILE also writes them as JSON.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("Star", "Night", "River", "Code", "Love", "War", "Ghost", "City", "Dream", "Fire", "Island",
         "Secret", "Road", "Winter", "Machine", "King", "Garden", "Storm", "Silent", "Last")
GENRES = ("Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Thriller", "Animation")


def make_checkpoint(model: str, candidates: int, history: int, out: Path) -> Path:
    from alro_ray.data.dataset import ranking_stats
    from alro_ray.rank.ranker import save_ranker
    from alro_ray.config import load_config
    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
    from alro_ray.data.tokenize import RankTokenizer

    cfg = load_config(None, [f"model.name={model}", f"data.candidates={candidates}", f"data.history={history}"])
    tok = load_tokenizer(model, cfg.model.cache_dir)
    peft_model = add_lora(load_base_model(cfg.model), cfg.model)
    stats = ranking_stats(candidates, history, RankTokenizer(tok, candidates).identifier_ids, model, "movies")
    return save_ranker(out, peft_model, tok, cfg, stats, data_dir=None)


def make_request(rng: random.Random, candidates: int, history: int, mode: str) -> dict:
    def item():
        title = " ".join(rng.sample(WORDS, 3)) + f" ({rng.randint(1950, 2020)})"
        return title, "|".join(rng.sample(GENRES, 2))

    hist = [{"title": t, "attributes": a, "rating": rng.randint(1, 5)} for t, a in (item() for _ in range(history))]
    cands = [{"id": f"i{j}", "title": t, "attributes": a} for j, (t, a) in enumerate(item() for _ in range(candidates))]
    return {"history": hist, "candidates": cands, "mode": mode}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 if empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))]


async def load_level(url: str, requests: list[dict], clients: int) -> dict:
    """`clients` concurrent clients send `requests` (each one after its previous answer)."""
    import httpx

    latencies: list[float] = []
    failures = 0
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            nonlocal failures
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/rank", json=body)
                latencies.append(time.perf_counter() - t0)
                failures += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    return {"requests": len(latencies), "failures": failures, "wall_s": wall,
            "rps": len(latencies) / wall, "p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99)}


async def fault_level(url: str, requests: list[dict], clients: int, kill_after: int) -> dict:
    """`clients` concurrent clients send `requests`; after `kill_after` answers the ranker replica
    is SIGKILLed. Returns counts, latencies before and from the kill, and the recovery time."""
    import httpx

    done: list[tuple[float, float, int]] = []  # (start, end, status), perf_counter seconds
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    fault: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                try:
                    status = (await client.post("/rank", json=body)).status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all
                done.append((t0, time.perf_counter(), status))

        async def killer():
            while len(done) < kill_after and queue:
                await asyncio.sleep(0.05)
            while True:  # /stats can time out (503) on a very busy machine: ask again
                r = await client.get("/stats")
                if r.status_code == 200:
                    pid = r.json()["pid"]
                    break
            os.kill(pid, signal.SIGKILL)  # the ranker replica's process, on this machine
            fault.update(pid=pid, t_kill=time.perf_counter())
            while True:  # until a new replica answers (bounded: the run itself is)
                await asyncio.sleep(0.25)
                try:
                    r = await client.get("/stats", timeout=15)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and r.json().get("pid") != pid:
                    fault.update(t_recovered=time.perf_counter(), new_pid=r.json()["pid"])
                    return
                if not queue and len(done) == len(requests):
                    return

        t0 = time.perf_counter()
        await asyncio.gather(killer(), *(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    t_kill = fault["t_kill"]
    before = sorted(e - s for s, e, st in done if e < t_kill)
    after = sorted(e - s for s, e, st in done if e >= t_kill)
    ok_ends = sorted(e for s, e, st in done if st == 200)
    gaps = [b - a for a, b in zip(ok_ends, ok_ends[1:]) if b >= t_kill]
    statuses: dict[str, int] = {}
    for _, _, st in done:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {"requests": len(done), "ok": statuses.get("200", 0), "failed": len(done) - statuses.get("200", 0),
            "statuses": statuses, "wall_s": wall, "killed_pid": fault["pid"], "new_pid": fault.get("new_pid"),
            "kill_at_s": t_kill - t0, "recover_s": fault.get("t_recovered", float("nan")) - t_kill,
            "longest_gap_s": max(gaps, default=0.0),
            "before": {"requests": len(before), "p50_ms": 1000 * pct(before, 50), "p99_ms": 1000 * pct(before, 99)},
            "after": {"requests": len(after), "p50_ms": 1000 * pct(after, 50), "p99_ms": 1000 * pct(after, 99),
                      "max_ms": 1000 * (after[-1] if after else 0.0)}}


def run_fault(args, ckpt: Path, port: int, rng: random.Random) -> int:
    """--fault kill-ranker: one ranker replica, batching on, SIGKILL mid-load."""
    from ray import serve

    from alro_ray.serve.app import run_serve

    clients = args.clients[-1]
    n = (args.requests or [3000])[-1]
    url = run_serve({"default": str(ckpt)}, host="127.0.0.1", port=port, blocking=False,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait,
                    num_cpus=args.num_cpus, torch_threads=args.num_cpus, ingress_num_cpus=0,
                    max_ongoing_requests=4 * clients, retry_attempts=args.retry_attempts)
    try:
        asyncio.run(load_level(url, [make_request(rng, args.candidates, args.history, args.mode)
                                     for _ in range(args.warmup)], 1))
        reqs = [make_request(rng, args.candidates, args.history, args.mode) for _ in range(n)]
        res = asyncio.run(fault_level(url, reqs, clients, kill_after=n // 3))
    finally:
        serve.shutdown()
    res.update(clients=clients, retry_attempts=args.retry_attempts, model=args.model)
    b, a = res["before"], res["after"]
    print(f"\nfault kill-ranker: model {args.model}, {clients} clients, {res['requests']} requests, "
          f"retry_attempts {args.retry_attempts}, wall {res['wall_s']:.0f} s")
    print(f"  ok {res['ok']}, failed {res['failed']} (statuses {res['statuses']})")
    print(f"  SIGKILL pid {res['killed_pid']} at {res['kill_at_s']:.1f} s; a new replica (pid {res['new_pid']}) "
          f"answered {res['recover_s']:.1f} s later; longest gap between answers {res['longest_gap_s']:.1f} s")
    print(f"  before the kill: {b['requests']} requests, p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms")
    print(f"  from the kill:   {a['requests']} requests, p50 {a['p50_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms, "
          f"max {a['max_ms']:.0f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args),
                                              "fault": res, "loadavg": os.getloadavg()[0]}, indent=2))
    return 1 if res["failed"] else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model alias (smollm2-135m, tiny-random) or path")
    p.add_argument("--candidates", type=int, default=5, help="C of the checkpoint and of every request")
    p.add_argument("--history", type=int, default=5, help="history items per request")
    p.add_argument("--mode", default="generate", choices=["generate", "one-pass"])
    p.add_argument("--clients", type=int, nargs="+", default=None, help="default 1 8 32; --fault: 32")
    p.add_argument("--requests", type=int, nargs="+", default=None,
                   help="requests per level (default: 12, 40, 96 for 1, 8, 32 clients)")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching on: @serve.batch max size")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batching on: batch_wait_timeout_s")
    p.add_argument("--num-cpus", type=int, default=1,
                   help="the ranker replica's CPUs = its torch threads (1: on the shared 2-core container, "
                        "2 threads were 3-20x slower, as OpenMP threads wait on each other under load)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--fault", choices=["kill-ranker"], help="SIGKILL the ranker replica mid-load (see above)")
    p.add_argument("--retry-attempts", type=int, default=4,
                   help="the ingress's retries of a request whose replica died (0: off)")
    args = p.parse_args(argv)
    args.clients = args.clients or ([32] if args.fault else [1, 8, 32])
    # bounded: about 2 min of load for tiny-random, 3 min for smollm2-135m on the 2-core container
    default_requests = {1: 12, 8: 40, 32: 96} if args.model == "tiny-random" else {1: 4, 8: 16, 32: 32}
    counts = args.requests or [default_requests.get(c, 2 * c) for c in args.clients]
    if len(counts) != len(args.clients):
        p.error("--requests needs one count per --clients level")

    import ray
    from ray import serve

    from alro_ray.serve.app import run_serve

    t_start = time.time()
    load_before = os.getloadavg()[0]
    rng = random.Random(0)
    tmp = tempfile.TemporaryDirectory(prefix="alro-bench-")
    ckpt = make_checkpoint(args.model, args.candidates, args.history, Path(tmp.name) / "ckpt")
    ray.init(address="local", num_cpus=max(2, args.num_cpus), include_dashboard=False,
             object_store_memory=512 * 1024 ** 2,
             log_to_driver=False)
    port = free_port()
    if args.fault:
        try:
            return run_fault(args, ckpt, port, rng)
        finally:
            ray.shutdown()
            tmp.cleanup()
    levels = [(c, [make_request(rng, args.candidates, args.history, args.mode) for _ in range(n)])
              for c, n in zip(args.clients, counts)]
    rows = []
    try:
        for batching, size in (("on", args.max_batch_size), ("off", 1)):
            url = run_serve({"default": str(ckpt)}, host="127.0.0.1", port=port, blocking=False,
                            max_batch_size=size, batch_wait_timeout_s=args.batch_wait if size > 1 else 0.0,
                            num_cpus=args.num_cpus, torch_threads=args.num_cpus, ingress_num_cpus=0,
                            max_ongoing_requests=4 * max(args.clients))
            warm = [make_request(rng, args.candidates, args.history, args.mode) for _ in range(args.warmup)]
            asyncio.run(load_level(url, warm, 1))
            for clients, reqs in levels:
                import httpx

                before = httpx.get(f"{url}/stats", timeout=30).json()
                res = asyncio.run(load_level(url, reqs, clients))
                after = httpx.get(f"{url}/stats", timeout=30).json()
                batches = after["batches"] - before["batches"]
                res.update(batching=batching, clients=clients,
                           mean_batch=(after["requests"] - before["requests"]) / max(1, batches))
                rows.append(res)
                print(f"  batching {batching:3s} clients {clients:3d}: {res['rps']:.2f} req/s, "
                      f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, mean batch {res['mean_batch']:.1f}"
                      + (f", {res['failures']} FAILED" if res["failures"] else ""), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\nmodel {args.model}, C={args.candidates}, H={args.history}, mode {args.mode}, "
          f"batching on = max_batch_size {args.max_batch_size}, wait {args.batch_wait} s; "
          f"off = max_batch_size 1; ranker on {args.num_cpus} CPU(s); total {time.time() - t_start:.0f} s; "
          f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"({os.cpu_count()} CPUs: other processes on the machine count too)\n")
    print(f"{'batching':8s} {'clients':>7s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'mean batch':>10s}")
    for r in rows:
        print(f"{r['batching']:8s} {r['clients']:7d} {r['requests']:8d} {r['rps']:7.2f} {r['p50_ms']:7.0f} "
              f"{r['p99_ms']:7.0f} {r['mean_batch']:10.1f}")
    print(f"\n{'clients':>7s} {'req/s on/off':>12s} {'p50 on/off':>10s} {'p99 on/off':>10s}")
    for c in args.clients:
        on = next(r for r in rows if r["batching"] == "on" and r["clients"] == c)
        off = next(r for r in rows if r["batching"] == "off" and r["clients"] == c)
        print(f"{c:7d} {on['rps'] / off['rps']:12.2f} {on['p50_ms'] / off['p50_ms']:10.2f} "
              f"{on['p99_ms'] / off['p99_ms']:10.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows,
                                              "loadavg": [load_before, os.getloadavg()[0]]}, indent=2))
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
