"""Faults of the Serve app, for real: a broken adapter next to a good one, and (slow) the ranker
replica SIGKILLed under load. The fault table is docs/faults.md.

One Serve app per module (a local Ray, tiny checkpoints in a temp dir, HTTP on 127.0.0.1).
"""

import asyncio
import os
import shutil
import signal
import time

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from alro_ray.serve.retry import ReplicaLost, call_with_retry
from test_serve import _free_port, _make_checkpoint, make_request

httpx = pytest.importorskip("httpx")

SETTINGS = dict(max_batch_size=8, batch_wait_timeout_s=0.02, num_cpus=1, ingress_num_cpus=0)


def _poison(ckpt, out, value):
    """A copy of checkpoint `ckpt` whose LoRA weights are all `value` (NaN: a broken adapter;
    1e30: finite weights whose activations overflow to inf, so the scores come out NaN)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, out)
    path = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    assert tensors and all("lora_" in k for k in tensors)
    save_file({k: torch.full_like(v, value) for k, v in tensors.items()}, str(path))
    return str(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_ckpt")
    good = _make_checkpoint(root / "good")
    return {"good": str(good), "nan": _poison(good, root / "nan", float("nan")),
            "overflow": _poison(good, root / "overflow", 1e30)}


@pytest.fixture(scope="module")
def server(checkpoints):
    import ray
    from ray import serve

    from alro_ray.serve.app import run_serve

    started = not ray.is_initialized()
    if started:  # address="local": see tests/test_serve.py
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 ** 2)
    url = run_serve({"default": checkpoints["good"], "nan": checkpoints["nan"], "overflow": checkpoints["overflow"]},
                    host="127.0.0.1", port=_free_port(), blocking=False, **SETTINGS)
    yield url
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


# ------------------------------------------------------------------------------------------
# non-finite weights or scores: a 500 with a reason, never an order; other adapters unaffected
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["generate", "one-pass"])
def test_nan_adapter_gets_a_5xx_json_and_the_good_one_still_answers(client, mode):
    req = make_request(n_candidates=4, seed=3, mode=mode)
    for _ in range(2):  # and again once it is loaded
        r = client.post("/rank", json={**req, "adapter": "nan"})
        assert r.status_code == 500, r.text
        body = r.json()
        assert set(body) == {"error"} and "ranking" not in body
        assert "'nan' is broken" in body["error"] and "NaN/inf" in body["error"]
        ok = client.post("/rank", json=req)  # the default adapter, same replica, same base model
        assert ok.status_code == 200, ok.text
        assert sorted(map(str, ok.json()["ranking"])) == sorted(str(c["id"]) for c in req["candidates"])
    assert "nan" in client.get("/stats").json()["broken_adapters"]


def test_overflowing_adapter_scores_are_refused_not_ranked(client):
    """Finite weights, NaN scores: caught on the scores themselves (one-pass returns them)."""
    r = client.post("/rank", json=make_request(n_candidates=3, seed=5, mode="one-pass", adapter="overflow"))
    assert r.status_code == 500, r.text
    assert "non-finite scores" in r.json()["error"] and "'overflow'" in r.json()["error"]
    assert "overflow" not in client.get("/stats").json()["broken_adapters"]  # its weights are finite
    assert client.post("/rank", json=make_request(mode="one-pass")).status_code == 200


# ------------------------------------------------------------------------------------------
# the ingress's retry (the function on its own; the real fault is the slow test below)
# ------------------------------------------------------------------------------------------


def _flaky(failures):
    """An async call that raises each of `failures` in turn, then returns the number of calls."""
    calls = []

    async def call():
        calls.append(time.monotonic())
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return len(calls)

    return call, calls


def test_retry_sends_again_after_a_replica_died_and_stops_when_spent():
    call, calls = _flaky([ActorDiedError(), ActorUnavailableError("gone", None)])
    assert asyncio.run(call_with_retry(call, attempts=4, budget_s=30)) == 3
    assert calls[2] - calls[1] >= 0.39 and calls[1] - calls[0] >= 0.19  # backoff 0.2 s, then 0.4 s

    call, calls = _flaky([ActorDiedError()] * 10)
    with pytest.raises(ReplicaLost, match="3 attempt"):
        asyncio.run(call_with_retry(call, attempts=2, budget_s=30))
    assert len(calls) == 3

    call, calls = _flaky([KeyError("a bug")])  # not a dead replica: no retry
    with pytest.raises(KeyError):
        asyncio.run(call_with_retry(call, attempts=4, budget_s=30))
    assert len(calls) == 1

    async def dies_then_hangs():
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()
        await asyncio.sleep(60)

    calls = []
    t0 = time.monotonic()
    with pytest.raises(ReplicaLost):  # a retry that never comes back is cut at the budget
        asyncio.run(call_with_retry(dies_then_hangs, attempts=4, budget_s=1.0))
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------
# the ranker replica SIGKILLed under load: no request fails
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ranker_replica_killed_under_load_loses_no_request(server, client):
    """4 clients send requests back to back; after 12 answers the ranker replica's process gets
    SIGKILL. Serve's controller starts a new one and the ingress sends the requests that were on
    the dead replica again: every request gets a 200, and the new replica answers."""
    old_pid = client.get("/stats").json()["pid"]
    statuses: list[int] = []
    seen = {"new_pid": None, "killed_at": None, "recovered_at": None}
    deadline = time.monotonic() + 240  # bounded whatever happens

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as ac:
            async def worker(k):
                i = 0
                while time.monotonic() < deadline:
                    if seen["new_pid"] and len(statuses) >= 40:
                        return
                    r = await ac.post("/rank", json=make_request(n_candidates=2 + (i + k) % 4, seed=100 * k + i,
                                                                 mode=("generate", "one-pass")[i % 2]))
                    statuses.append(r.status_code)
                    i += 1

            async def killer():
                while len(statuses) < 12:
                    await asyncio.sleep(0.05)
                os.kill(old_pid, signal.SIGKILL)
                seen["killed_at"] = time.monotonic()
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    r = await ac.get("/stats")
                    if r.status_code == 200 and r.json()["pid"] != old_pid:
                        seen["new_pid"], seen["recovered_at"] = r.json()["pid"], time.monotonic()
                        return

            await asyncio.gather(killer(), *(worker(k) for k in range(4)))

    asyncio.run(run())
    print(f"requests {len(statuses)}, new replica answered {seen['recovered_at'] - seen['killed_at']:.1f} s "
          f"after the SIGKILL" if seen["recovered_at"] else "no new replica")
    assert seen["new_pid"] not in (None, old_pid)
    assert len(statuses) >= 40 and statuses.count(200) == len(statuses), statuses
    assert client.get("/healthz").json() == {"status": "ok"}
