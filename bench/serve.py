"""Serving benchmark: requests/s and p50/p99 latency at 1, 8 and 32 concurrent HTTP clients,
with dynamic batching on and off, for the Serve app of `alro_ray.serve.app`.

    python bench/serve.py                      # smollm2-135m, untrained LoRA adapter, ~4 min on 2 CPUs
    python bench/serve.py --model tiny-random  # quick run (~2 min, most of it Ray and Serve start-up)

Load and faults (10,000 requests, overload, the ranker SIGKILLed) are bench/serve_load.py's.

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
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, nargs="+", default=None,
                   help="requests per level (default: 12, 40, 96 for 1, 8, 32 clients)")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching on: @serve.batch max size")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batching on: batch_wait_timeout_s")
    p.add_argument("--num-cpus", type=int, default=1,
                   help="the ranker replica's CPUs = its torch threads (1: on the shared 2-core container, "
                        "2 threads were 3-20x slower, as OpenMP threads wait on each other under load)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
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
            serve.delete("alro")  # the next setting is a new app (run_serve refuses to replace one)
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
