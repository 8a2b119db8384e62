"""Serve under load and faults: the figures of the Serve rows in docs/faults.md.

    python bench/serve_load.py steady        # 10,000 requests from 32 clients: no error, every answer right
    python bench/serve_load.py overload      # 128 clients on a small queue: only 200 and 503, the 200s right
    python bench/serve_load.py overload --honor-retry-after   # the same with clients that wait Retry-After
    python bench/serve_load.py kill-ranker   # the ranker replica SIGKILLed under 32-client load: none fails
    python bench/serve_load.py kill-ranker --retry-attempts 0   # the same without the ingress's retry

Each run writes an untrained tiny-random checkpoint (C=5, H=5) to a temp dir, starts a local Ray
(2 CPUs) and the Serve app on 127.0.0.1 (one ranker replica on 1 CPU, generate mode), sends a
fixed number of requests (bounded) and prints the counts per status and latencies. Requests
come from a pool of 64 distinct ones whose answers are first taken one at a time: an answer under
load that differs from its request's answer alone counts as wrong.

kill-ranker: after a third of the requests are answered the ranker replica's process (its pid
from GET /stats) gets SIGKILL; prints the time until a new replica answered and the longest gap
between answers.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
bench_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)  # make_checkpoint, make_request, pct, free_port

SCENARIOS = {  # clients, requests, settings
    "steady": (32, 10_000, {}),
    "overload": (128, 5_000, {"max_ongoing_requests": 8, "max_queued_requests": 8}),
    "kill-ranker": (32, 3_000, {}),
}


@dataclass
class Load:
    """What the clients saw: (start, end, status) per request, wrong answers, 503s without Retry-After."""

    done: list[tuple[float, float, int]] = field(default_factory=list)
    wrong: int = 0
    bad_503: int = 0  # a 503 without Retry-After or without a JSON error
    errors: dict[str, int] = field(default_factory=dict)  # non-200 reason -> count (first 60 characters)
    health_s: list[float] = field(default_factory=list)  # GET /healthz latencies during the load

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, st in self.done:
            out[str(st)] = out.get(str(st), 0) + 1
        return dict(sorted(out.items()))

    def latency_ms(self, status: int | None = None, after: float = float("-inf"), before: float = float("inf")
                   ) -> dict:
        """Percentiles of the requests with `status` (any: None) that ended in [after, before)."""
        lat = sorted(e - s for s, e, st in self.done if (status is None or st == status) and after <= e < before)
        return {"n": len(lat), "p50_ms": 1000 * bench_serve.pct(lat, 50), "p99_ms": 1000 * bench_serve.pct(lat, 99),
                "max_ms": 1000 * (lat[-1] if lat else 0.0)}


async def send(url: str, pool: list[dict], expected: list[list], clients: int, n: int, load: Load,
               honor_retry_after: bool = False) -> None:
    """`clients` concurrent clients send `n` requests from `pool` (each after its previous answer;
    with `honor_retry_after`, after a 503 a client first waits its Retry-After, as a polite one does)."""
    import httpx

    queue = list(range(n - 1, -1, -1))
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop() % len(pool)
                t0 = time.perf_counter()
                try:
                    r = await client.post("/rank", json=pool[i])
                    status = r.status_code
                except httpx.HTTPError:
                    status, r = 0, None  # no answer at all
                load.done.append((t0, time.perf_counter(), status))
                if status == 200:
                    load.wrong += r.json()["ranking"] != expected[i]
                    continue
                reason = "no answer" if r is None else _reason(r)
                load.errors[reason] = load.errors.get(reason, 0) + 1
                if status == 503 and ("retry-after" not in r.headers or reason == "not JSON"):
                    load.bad_503 += 1
                elif status == 503 and honor_retry_after:
                    await asyncio.sleep(float(r.headers["retry-after"]))

        await asyncio.gather(*(worker() for _ in range(clients)))


def _reason(r) -> str:
    try:
        return str(r.json()["error"])[:60]
    except Exception:
        return "not JSON"


async def probe_health(url: str, load: Load, total: int) -> None:
    """GET /healthz every 0.5 s while the load runs: the HTTP path's own delay (the ingress
    answers it without the ranker), to set the /rank latencies against."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while len(load.done) < total:
            t0 = time.perf_counter()
            try:
                if (await client.get("/healthz")).status_code == 200:
                    load.health_s.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


async def kill_ranker(url: str, load: Load, after: int, total: int) -> dict:
    """SIGKILL the ranker replica after `after` answers; wait until a new replica answers."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while len(load.done) < after:
            await asyncio.sleep(0.05)
        while True:  # /stats goes through the ranker's queue: ask again while it is busy
            r = await client.get("/stats")
            if r.status_code == 200:
                pid = r.json()["pid"]
                break
            await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGKILL)  # the ranker replica's process, on this machine
        fault = {"pid": pid, "t_kill": time.perf_counter()}
        while len(load.done) < total:
            await asyncio.sleep(0.25)
            try:
                r = await client.get("/stats", timeout=15)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and r.json().get("pid") != pid:
                return fault | {"new_pid": r.json()["pid"], "t_recovered": time.perf_counter()}
        return fault


def report(name: str, load: Load, wall: float, fault: dict | None) -> dict:
    ok = load.statuses().get("200", 0)
    res = {"scenario": name, "requests": len(load.done), "statuses": load.statuses(), "failed": len(load.done) - ok,
           "wrong_answers": load.wrong, "503_without_retry_after_or_json": load.bad_503, "errors": load.errors,
           "wall_s": wall, "req_per_s": len(load.done) / wall, "all": load.latency_ms(),
           "ok": load.latency_ms(200), "refused_503": load.latency_ms(503)}
    health = sorted(load.health_s)
    res["healthz"] = {"n": len(health), "p50_ms": 1000 * bench_serve.pct(health, 50),
                      "p99_ms": 1000 * bench_serve.pct(health, 99), "max_ms": 1000 * (health[-1] if health else 0)}
    print(f"\n{name}: {res['requests']} requests in {wall:.0f} s ({res['req_per_s']:.1f}/s); statuses "
          f"{res['statuses']}; wrong answers {load.wrong}; 503s without Retry-After or JSON {load.bad_503}")
    for label in ("all", "ok", "refused_503", "healthz"):
        if res[label]["n"]:
            print(f"  {label:12s} n {res[label]['n']:6d}  p50 {res[label]['p50_ms']:7.0f} ms  "
                  f"p99 {res[label]['p99_ms']:7.0f} ms  max {res[label]['max_ms']:7.0f} ms")
    if load.errors:
        print(f"  reasons: {load.errors}")
    if fault:
        t_kill = fault["t_kill"]
        ends = sorted(e for s, e, st in load.done if st == 200)
        res["fault"] = {"killed_pid": fault["pid"], "new_pid": fault.get("new_pid"),
                        "recover_s": fault.get("t_recovered", float("nan")) - t_kill,
                        "longest_gap_s": max((b - a for a, b in zip(ends, ends[1:]) if b >= t_kill), default=0.0),
                        "before_kill": load.latency_ms(before=t_kill), "from_kill": load.latency_ms(after=t_kill)}
        f = res["fault"]
        print(f"  SIGKILL pid {f['killed_pid']}; a new replica (pid {f['new_pid']}) answered {f['recover_s']:.1f} s "
              f"later; longest gap between answers {f['longest_gap_s']:.1f} s; from the kill on: p50 "
              f"{f['from_kill']['p50_ms']:.0f} ms, p99 {f['from_kill']['p99_ms']:.0f} ms, max "
              f"{f['from_kill']['max_ms']:.0f} ms")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--clients", type=int, help="default: 32, 128 for overload")
    p.add_argument("--requests", type=int, help="default: 10,000 steady, 5,000 overload, 3,000 kill-ranker")
    p.add_argument("--retry-attempts", type=int, default=4, help="the ingress's retries when a replica died")
    p.add_argument("--honor-retry-after", action="store_true",
                   help="a client that got 503 waits its Retry-After before its next request (default: at once)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    clients, n, extra = SCENARIOS[args.scenario]
    clients, n = args.clients or clients, args.requests or n

    import httpx
    import ray
    from ray import serve

    from alro_ray.serve.app import run_serve

    rng = random.Random(0)
    tmp = tempfile.TemporaryDirectory(prefix="alro-bench-")
    load_before = os.getloadavg()[0]
    ckpt = bench_serve.make_checkpoint("tiny-random", 5, 5, Path(tmp.name) / "ckpt")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 ** 2,
             log_to_driver=False)
    settings = dict(max_batch_size=8, batch_wait_timeout_s=0.01, num_cpus=1, torch_threads=1, ingress_num_cpus=0,
                    retry_attempts=args.retry_attempts) | extra
    try:
        url = run_serve({"default": str(ckpt)}, host="127.0.0.1", port=bench_serve.free_port(), blocking=False,
                        **settings)
        pool = [bench_serve.make_request(rng, 5, 5, "generate") for _ in range(64)]
        expected = [httpx.post(f"{url}/rank", json=r, timeout=60).json()["ranking"] for r in pool]
        load = Load()

        async def scenario():
            jobs = [send(url, pool, expected, clients, n, load, args.honor_retry_after),
                    probe_health(url, load, n)]
            if args.scenario == "kill-ranker":
                jobs.append(kill_ranker(url, load, n // 3, n))
            return (await asyncio.gather(*jobs))[2:]

        t0 = time.perf_counter()
        faults = asyncio.run(scenario())
        wall = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    res = report(args.scenario, load, wall, faults[0] if faults else None)
    res.update(clients=clients, honor_retry_after=args.honor_retry_after, settings=settings, loadavg=[load_before, os.getloadavg()[0]],
               date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count())
    print(f"  {clients} clients; settings {settings}; 1-min load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    bad = res["failed"] - res["statuses"].get("503", 0) if args.scenario == "overload" else res["failed"]
    return 1 if bad or load.wrong or load.bad_503 else 0


if __name__ == "__main__":
    sys.exit(main())
