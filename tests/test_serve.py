"""The Serve application for real: a local Ray, two tiny checkpoints, HTTP on 127.0.0.1.

One Serve app is started per module (about 20 s on 2 CPUs) and shut down at the end; every
request loop is bounded. The schemathesis fuzz run is at the bottom (about 30 s).
"""

import asyncio
import json
import shutil
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

C = 5  # candidates the test checkpoints were "trained" with
LIMITS = dict(max_history=8, max_title_chars=60, max_attribute_chars=40, max_body_bytes=64 * 1024,
              max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=1, ingress_num_cpus=0,
              max_adapters_per_replica=1)  # every switch of adapter evicts the other: exercises the LRU
TRAINED_TITLE_CHARS, TRAINED_ATTRIBUTE_CHARS = 30, 20  # checkpoint a's training cut (data.max_*_chars)


def _make_checkpoint(out_dir, perturb_seed=None, overrides=()):
    import torch

    from alro_ray.data.dataset import ranking_stats
    from alro_ray.rank.ranker import save_ranker
    from alro_ray.config import load_config
    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
    from alro_ray.data.tokenize import RankTokenizer

    cfg = load_config("configs/tiny.yaml", list(overrides))
    tok = load_tokenizer("tiny-random")
    model = add_lora(load_base_model(cfg.model), cfg.model)
    if perturb_seed is not None:  # a different "trained" adapter: random LoRA B (A is random already)
        torch.manual_seed(perturb_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1.0)
    stats = ranking_stats(C, 6, RankTokenizer(tok, C).identifier_ids, "tiny-random", "movies")
    return save_ranker(out_dir, model, tok, cfg, stats, data_dir=None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from alro_ray.rank.fusion import save_fusion_defaults

    root = tmp_path_factory.mktemp("serve_ckpt")
    a = _make_checkpoint(root / "a", overrides=[f"data.max_title_chars={TRAINED_TITLE_CHARS}",
                                                f"data.max_attribute_chars={TRAINED_ATTRIBUTE_CHARS}"])
    b = _make_checkpoint(root / "b", perturb_seed=1)
    other = root / "other_base"  # same files, but claims another base model
    shutil.copytree(a, other)
    info = json.loads((other / "ranker.json").read_text())
    info["base_model"] = "smollm2-135m"
    (other / "ranker.json").write_text(json.dumps(info))
    # b carries a saved fusion weight (as `alro evaluate --fuse mf --save-fusion` writes it): all MF
    save_fusion_defaults(b, {"fused-one-pass-mf": {"mode": "one-pass", "baseline": "mf", "method": "score",
                                                   "weight": 0.0, "valid_ndcg@10": 0.9, "valid_lists": 10}}, "test")
    return {"a": str(a), "b": str(b), "other": str(other)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """The session's Ray if one is up, else a local one for this module. address="local": a stale
    /tmp/ray/ray_current_cluster left by someone's `ray start` must not make ray.init connect to it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 ** 2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(local_ray, checkpoints):
    from ray import serve

    from alro_ray.serve.app import run_serve

    # "movies.v2": a dot cannot be in a PEFT adapter name (the entry is loaded under an internal one)
    url = run_serve({"default": checkpoints["a"], "b": checkpoints["b"], "movies.v2": checkpoints["a"]},
                    host="127.0.0.1", port=_free_port(), blocking=False, **LIMITS)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def make_request(n_candidates=3, n_history=3, seed=0, **extra):
    history = [{"title": f"Movie {seed}-{i}", "attributes": "Drama|War" if i % 2 else "Comedy",
                "rating": 1 + (i + seed) % 5} for i in range(n_history)]
    history[-1].pop("rating")  # ratings are optional
    candidates = [{"id": f"c{seed}-{j}" if j % 2 else 100 * seed + j, "title": f"Film {seed} {j}",
                   "attributes": ["Action", "Sci-Fi"] if j % 2 else "Horror"} for j in range(n_candidates)]
    return {"history": history, "candidates": candidates, **extra}


def _local_answer(path, req, mode):
    """What the checkpoint ranks when loaded in this process, with the training template."""
    from alro_ray.rank.ranker import load_ranker
    from alro_ray.data.prompts import Item

    def attrs(a):
        return a if isinstance(a, str) else "|".join(a)

    ranker = load_ranker(path)
    history = [(Item(h["title"], attrs(h.get("attributes", ""))), h.get("rating")) for h in req["history"]]
    cands = [Item(c["title"], attrs(c.get("attributes", ""))) for c in req["candidates"]]
    orders, scores = ranker.rank([ranker.prompt_ids(history, cands)], mode, len(cands))
    ids = [c["id"] for c in req["candidates"]]
    return [ids[j] for j in orders[0]], scores[0]


# ------------------------------------------------------------------------------------------
# valid requests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["generate", "one-pass"])
@pytest.mark.parametrize("n", [2, 3, C])
def test_valid_request_returns_a_permutation(client, mode, n):
    req = make_request(n_candidates=n, seed=n, mode=mode)
    r = client.post("/rank", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [c["id"] for c in req["candidates"]]
    assert sorted(map(str, body["ranking"])) == sorted(map(str, ids))
    assert len(body["ranking"]) == n and set(map(type, body["ranking"])) <= {int, str}
    assert set(body["scores"]) == {str(i) for i in ids}
    assert body["adapter"] == "default" and body["mode"] == mode and body["batch_size"] >= 1
    # best first: the scores agree with the order
    ranked = [body["scores"][str(i)] for i in body["ranking"]]
    assert ranked == sorted(ranked, reverse=True)


def test_served_answer_matches_the_checkpoint_with_the_training_template(client, checkpoints):
    req = make_request(n_candidates=4, seed=7)
    for mode in ("generate", "one-pass"):
        body = client.post("/rank", json={**req, "mode": mode}).json()
        order, scores = _local_answer(checkpoints["a"], req, mode)
        assert body["ranking"] == order
        ids = [c["id"] for c in req["candidates"]]
        assert [body["scores"][str(i)] for i in ids] == pytest.approx(scores, abs=1e-4)
    default_mode = client.post("/rank", json=req).json()["mode"]
    assert default_mode == "generate"


def test_two_adapters_give_their_own_answers(client, checkpoints):
    differ = 0
    for seed in range(4):
        req = make_request(n_candidates=C, seed=seed, mode="one-pass")
        a = client.post("/rank", json=req).json()
        b = client.post("/rank", json={**req, "adapter": "b"}).json()
        assert a["adapter"] == "default" and b["adapter"] == "b"
        assert b["ranking"] == _local_answer(checkpoints["b"], req, "one-pass")[0]
        assert a["ranking"] == _local_answer(checkpoints["a"], req, "one-pass")[0]
        differ += a["scores"] != b["scores"]
    assert differ == 4


def test_concurrent_mixed_requests_are_batched_and_grouped(client, server):
    """16 concurrent requests mixing adapters, modes and candidate counts: same answers as one by one."""
    reqs = [make_request(n_candidates=2 + i % 4, seed=i, mode=("generate", "one-pass")[i % 2],
                         adapter=("default", "b")[(i // 2) % 2]) for i in range(16)]
    alone = [client.post("/rank", json=r).json() for r in reqs]
    before = client.get("/stats").json()

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/rank", json=r) for r in reqs))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    together = [r.json() for r in responses]
    for one, many in zip(alone, together):
        assert many["ranking"] == one["ranking"] and many["adapter"] == one["adapter"]
        assert many["scores"] == pytest.approx(one["scores"], abs=1e-4)
    assert max(r["batch_size"] for r in together) > 1
    after = client.get("/stats").json()
    assert after["requests"] - before["requests"] == 16
    assert any(int(size) > 1 for size in after["batch_sizes"])
    assert after["adapter_loads"] > before["adapter_loads"]  # adapters were evicted and loaded again


# ------------------------------------------------------------------------------------------
# bad input: always a 4xx with a JSON error, and the server keeps serving
# ------------------------------------------------------------------------------------------

def _bad_cases():
    ok = make_request()
    long_title = dict(ok, candidates=[{"id": 1, "title": "x" * 61}, {"id": 2, "title": "y"}])
    raw = json.dumps(ok)
    cases = {
        "invalid JSON": (400, {"content": b'{"history": [', "headers": {"content-type": "application/json"}}),
        "not an object": (422, {"json": [ok]}),
        "empty body": (422, {"content": b"", "headers": {"content-type": "application/json"}}),
        "missing history": (422, {"json": {"candidates": ok["candidates"]}}),
        "missing candidates": (422, {"json": {"history": ok["history"]}}),
        "empty history": (422, {"json": dict(ok, history=[])}),
        "empty candidates": (422, {"json": dict(ok, candidates=[])}),
        "missing title": (422, {"json": dict(ok, candidates=[{"id": 1}, {"id": 2, "title": "y"}])}),
        "blank title": (422, {"json": dict(ok, candidates=[{"id": 1, "title": " \n "}, {"id": 2, "title": "y"}])}),
        "empty id": (422, {"json": dict(ok, candidates=[{"id": "", "title": "x"}, {"id": 2, "title": "y"}])}),
        "duplicate ids": (422, {"json": dict(ok, candidates=[{"id": "a", "title": "x"}, {"id": "a", "title": "y"}])}),
        "duplicate ids across types": (422, {"json": dict(ok, candidates=[{"id": 1, "title": "x"},
                                                                          {"id": "1", "title": "y"}])}),
        "one candidate": (422, {"json": dict(ok, candidates=ok["candidates"][:1])}),
        "more candidates than C": (422, {"json": make_request(n_candidates=C + 1)}),
        "far more candidates than C": (422, {"json": make_request(n_candidates=30)}),
        "title too long": (422, {"json": long_title}),
        "attributes too long": (422, {"json": dict(ok, candidates=[{"id": 1, "title": "x", "attributes": "a" * 41},
                                                                   {"id": 2, "title": "y"}])}),
        "attribute list too long": (422, {"json": dict(ok, candidates=[
            {"id": 1, "title": "x", "attributes": ["a"] * 21}, {"id": 2, "title": "y"}])}),
        "attribute list over the limit once joined": (422, {"json": dict(ok, candidates=[
            {"id": 1, "title": "x", "attributes": ["a" * 25, "b" * 25]}, {"id": 2, "title": "y"}])}),
        "history too long": (422, {"json": make_request(n_history=9)}),
        "unknown adapter": (404, {"json": dict(ok, adapter="nope")}),
        "adapter given as a path": (404, {"json": dict(ok, adapter="/tmp")}),
        "adapter given as a relative path": (404, {"json": dict(ok, adapter="../runs/tiny/final")}),
        "unknown mode": (422, {"json": dict(ok, mode="beam")}),
        "candidates not a list": (422, {"json": dict(ok, candidates="abc")}),
        "rating not a number": (422, {"json": dict(ok, history=[{"title": "t", "rating": "five"}])}),
        "rating NaN": (422, {"content": raw.replace('"rating": 1', '"rating": NaN').encode(),
                             "headers": {"content-type": "application/json"}}),
        "id a float": (422, {"json": dict(ok, candidates=[{"id": 1.5, "title": "x"}, {"id": 2, "title": "y"}])}),
        "id a bool": (422, {"json": dict(ok, candidates=[{"id": True, "title": "x"}, {"id": 2, "title": "y"}])}),
        "title a number": (422, {"json": dict(ok, candidates=[{"id": 1, "title": 5}, {"id": 2, "title": "y"}])}),
        "unknown field": (422, {"json": dict(ok, user_id=3)}),
        "lone surrogate": (422, {"content": raw.replace("Film 0 0", "Film \\ud800").encode(),
                                 "headers": {"content-type": "application/json"}}),
        "compressed body": (415, {"content": raw.encode(), "headers": {"content-type": "application/json",
                                                                       "content-encoding": "gzip"}}),
        "body over the limit": (413, {"json": dict(ok, padding="x" * 70_000)}),
        "chunked body over the limit": (413, {"content": iter([b"[" + b" " * 40_000] * 3),
                                              "headers": {"content-type": "application/json"}}),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_with_a_json_error(client, case):
    status, kwargs = BAD[case]
    r = client.post("/rank", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert client.post("/rank", json=make_request()).status_code == 200  # still serving


def test_candidate_ids_come_back_byte_for_byte(client):
    """Ids are opaque: ids that differ only in spaces are distinct, and none comes back changed."""
    ids = ["a b", "a  b", " a", "a\tb ", "x\u00a0y"]
    req = make_request(n_candidates=len(ids), seed=4)
    for c, i in zip(req["candidates"], ids):
        c["id"] = i
    r = client.post("/rank", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["ranking"]) == sorted(ids) and sorted(body["scores"]) == sorted(ids)


def test_an_adapter_name_peft_cannot_hold_is_served(client):
    """"movies.v2" (checkpoint a, as "default"): PEFT refuses a dot in an adapter name."""
    req = make_request(n_candidates=4, seed=11, mode="one-pass")
    r = client.post("/rank", json={**req, "adapter": "movies.v2"})
    assert r.status_code == 200, r.text
    same = client.post("/rank", json=req).json()
    assert r.json()["adapter"] == "movies.v2" and r.json()["ranking"] == same["ranking"]
    assert r.json()["scores"] == pytest.approx(same["scores"], abs=1e-4)


def test_registry_gives_every_adapter_a_name_peft_can_hold(checkpoints):
    from alro_ray.serve.app import load_registry

    reg = load_registry({"eval": checkpoints["a"], "to.v2": checkpoints["a"], "default": checkpoints["b"]})
    names = [e.peft_name for e in reg.values()]
    assert len(set(names)) == 3 and all(n.isidentifier() for n in names)


def test_titles_and_attributes_are_cut_as_training_cut_them(client, checkpoints):
    """Checkpoint a was trained with titles cut to 30 characters and attributes to 20: Serve shows
    the model the same cut (the request limits, 60 and 40, only refuse)."""
    req = make_request(n_candidates=3, seed=3, mode="one-pass")
    req["history"][0]["title"] = "A Very Long History Title That Training Would Cut"
    req["candidates"][0]["title"] = "The Extraordinary Adventures of Someone Long-Titled"
    req["candidates"][1]["attributes"] = ["Action", "Adventure", "Comedy", "Drama"]
    cut = json.loads(json.dumps(req))
    for item in cut["history"] + cut["candidates"]:
        item["title"] = item["title"][:TRAINED_TITLE_CHARS]
        attrs = item.get("attributes", "")
        item["attributes"] = (attrs if isinstance(attrs, str) else "|".join(attrs))[:TRAINED_ATTRIBUTE_CHARS]
    body = client.post("/rank", json=req).json()
    ids = [c["id"] for c in req["candidates"]]
    order, scores = _local_answer(checkpoints["a"], cut, "one-pass")
    assert body["ranking"] == order
    assert [body["scores"][str(i)] for i in ids] == pytest.approx(scores, abs=1e-4)
    _, uncut_scores = _local_answer(checkpoints["a"], req, "one-pass")
    assert [body["scores"][str(i)] for i in ids] != pytest.approx(uncut_scores, abs=1e-4)


def test_fusion_takes_the_adapters_saved_weight_when_the_request_names_none(client):
    req = make_request(n_candidates=3, mode="one-pass", fusion={"classical": "mf"})
    for c, mf in zip(req["candidates"], (2.0, 4.5, 3.0)):
        c["hints"] = {"mf_score": mf}
    r = client.post("/rank", json=dict(req, adapter="b"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fusion"] == {"classical": "mf", "weight": 0.0, "method": "score", "weight_from": "adapter"}
    ids = [c["id"] for c in req["candidates"]]
    assert body["ranking"] == [ids[1], ids[2], ids[0]]  # weight 0: MF's order
    r = client.post("/rank", json=req)  # the default adapter has no saved weight
    assert r.status_code == 422 and "--save-fusion" in r.json()["error"]
    r = client.post("/rank", json=dict(req, adapter="b", fusion={"classical": "mf", "method": "rrf"}))
    assert r.status_code == 422 and "chosen for fusion method 'score'" in r.json()["error"]
    adapters = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert adapters["b"]["fusion_defaults"] == {"one-pass/mf": {"weight": 0.0, "method": "score"}}


def test_error_messages_say_what_is_wrong(client):
    r = client.post("/rank", json=make_request(n_candidates=C + 1))
    assert "candidates" in r.json()["error"]
    dup = [{"id": "a", "title": "x"}, {"id": "a", "title": "y"}]
    r = client.post("/rank", json=dict(make_request(), candidates=dup))
    assert "duplicate candidate ids" in r.json()["error"] and r.json()["detail"]
    r = client.post("/rank", json=dict(make_request(), adapter="nope"))
    assert "unknown adapter" in r.json()["error"] and "default" in r.json()["error"]


def test_other_routes_and_methods(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/rank").status_code == 405
    assert "error" in client.get("/nope").json()


# ------------------------------------------------------------------------------------------
# health, adapters, schema
# ------------------------------------------------------------------------------------------


def test_health_adapters_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert "pid" in client.get("/stats").json()  # no API key set: nothing is hidden
    body = client.get("/adapters").json()
    assert body["default"] == "default"
    assert {a["name"]: a["candidates"] for a in body["adapters"]} == {"default": C, "b": C, "movies.v2": C}
    assert all("path" not in a for a in body["adapters"])  # checkpoint paths stay private
    schema = client.get("/openapi.json").json()
    req = schema["components"]["schemas"]["RankRequest"]
    assert req["properties"]["candidates"]["maxItems"] == C
    assert req["properties"]["history"]["maxItems"] == LIMITS["max_history"]
    assert {"400", "404", "413", "422"} <= set(schema["paths"]["/rank"]["post"]["responses"])
    assert client.get("/docs").status_code == 200
    limits = client.get("/limits").json()
    assert limits["max_body_bytes"] == LIMITS["max_body_bytes"]
    assert limits["candidates"] == {"default": C, "b": C, "movies.v2": C}


# ------------------------------------------------------------------------------------------
# registry and settings (no server)
# ------------------------------------------------------------------------------------------


def test_registry_checks_at_start(checkpoints, tmp_path):
    from alro_ray.errors import ConfigError
    from alro_ray.serve.app import ServeSettings, adapters_from_args, load_registry

    reg = load_registry({"default": checkpoints["a"], "b": checkpoints["b"]})
    assert reg["b"].candidates == C
    with pytest.raises(ConfigError, match="different base models"):
        load_registry({"default": checkpoints["a"], "x": checkpoints["other"]})
    with pytest.raises(ConfigError, match="not a ranker checkpoint"):
        load_registry({"default": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown config key serve.max_batch "):
        ServeSettings.from_dict({"adapters": {"default": "x"}, "max_batch": 3})
    with pytest.raises(ConfigError, match="serve.batch_wait_timeout_s must be a number, got 'soon'"):
        ServeSettings.from_dict({"adapters": {"default": "x"}, "batch_wait_timeout_s": "soon"})
    with pytest.raises(ConfigError, match="serve.default_mode must be one of"):
        ServeSettings.from_dict({"adapters": {"default": "x"}, "default_mode": "best"})
    with pytest.raises(ConfigError, match="adapter name"):
        ServeSettings.from_dict({"adapters": {"../x": "x"}})
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServeSettings.from_dict({"adapters": {"default": "x"}, "max_batch_size": 0})
    assert adapters_from_args("runs/x") == {"default": "runs/x"}
    assert adapters_from_args(None, ["a=/p/a", "b=/p/b"]) == {"a": "/p/a", "b": "/p/b"}
    with pytest.raises(ConfigError):
        adapters_from_args(None, ["a"])


def test_the_ingress_maps_a_full_queue_to_503_and_a_slow_ranker_to_504():
    """ask_ranker on a stand-in handle (no Serve): Serve's back-pressure error becomes 503 with
    Retry-After, a ranker that does not answer in request_timeout_s a 504, both with a reason."""
    from ray.serve.exceptions import BackPressureError

    from alro_ray.data.prompts import Item
    from alro_ray.serve.app import ServeSettings
    from alro_ray.serve.contract import RankJob
    from alro_ray.serve.routes import ask_ranker

    class Handle:  # what the ingress calls: handle.options(...).rank.remote(job)
        def __init__(self, answer):
            self.answer = answer
            self.rank = self

        def options(self, **_):
            return self

        def remote(self, job):
            return self.answer()

    async def full():
        raise BackPressureError(num_queued_requests=2, max_queued_requests=2)

    async def never():
        await asyncio.sleep(60)

    settings = ServeSettings.from_dict({"adapters": {"default": "x"}, "request_timeout_s": 0.2, "retry_after_s": 3})
    job = RankJob("default", "generate", [(Item("a"), None)], [Item("b"), Item("c")], ["b", "c"])
    r = asyncio.run(ask_ranker(Handle(full), job, settings))
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert json.loads(r.body)["error"].startswith("overloaded: the ranker's queue is full")
    r = asyncio.run(ask_ranker(Handle(never), job, settings))
    assert r.status_code == 504 and "request_timeout_s" in json.loads(r.body)["error"]


def test_a_retry_waits_for_room_in_a_full_queue_but_a_first_attempt_is_refused():
    """After its replica died, a request waits while the queue is full of the dead replica's other
    requests (budget, not attempts); a new request that finds it full is refused at once."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from alro_ray.serve.retry import call_with_retry

    def flaky(failures):
        calls = []

        async def call():
            calls.append(1)
            if len(calls) <= len(failures):
                raise failures[len(calls) - 1]
            return "ranked"

        return call, calls

    full = BackPressureError(num_queued_requests=2, max_queued_requests=2)
    call, calls = flaky([ActorDiedError()] + [full] * 6)  # more than `attempts` tries, within the budget
    assert asyncio.run(call_with_retry(call, attempts=2, budget_s=30)) == "ranked" and len(calls) == 8
    call, calls = flaky([full])
    with pytest.raises(BackPressureError):
        asyncio.run(call_with_retry(call, attempts=4, budget_s=30))
    assert len(calls) == 1


def test_yaml_config_is_a_valid_serve_config(checkpoints):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from alro_ray.serve.app import build_app

    config = yaml.safe_load(open("serve/config.yaml"))
    ServeDeploySchema.model_validate(config)
    (app_cfg,) = config["applications"]
    assert app_cfg["import_path"] == "alro_ray.serve.app:build_app"
    args = dict(app_cfg["args"], adapters={"default": checkpoints["a"]})
    build_app(args)  # builds the application graph (nothing deployed)
    names = {d["name"] for d in app_cfg["deployments"]}
    assert names == {"ingress", "ranker"}


# ------------------------------------------------------------------------------------------
# a second `alro serve` (a real process) beside the first: its own app and route, an API key,
# a small queue; then SIGTERM
# ------------------------------------------------------------------------------------------

API_KEY = "s3cret-key"
SLOW_BATCH_S = 2.0  # the second app's batches wait this long (never full): requests stay in flight


@pytest.fixture(scope="module")
def second_app(server, checkpoints, local_ray, tmp_path_factory):
    """`alro serve` in a subprocess, joined to this module's Ray (RAY_ADDRESS), on the first app's
    port as app "second" at /second, with ALRO_SERVE_API_KEY set; 4 requests at a time on the
    ranker, 2 more queued, batches of up to 8 that wait SLOW_BATCH_S."""
    import os
    import subprocess
    import sys

    log = tmp_path_factory.mktemp("second_serve") / "alro-serve.log"
    env = dict(os.environ, RAY_ADDRESS=local_ray.get_runtime_context().gcs_address, ALRO_SERVE_API_KEY=API_KEY)
    cmd = [sys.executable, "-m", "alro_ray.cli", "serve", "--checkpoint", checkpoints["a"],
           "--port", server.rsplit(":", 1)[1], "--app-name", "second", "--route-prefix", "/second",
           "--max-batch-size", "8", "--batch-wait-timeout-s", str(SLOW_BATCH_S), "--max-queued-requests", "2",
           "--set", "max_ongoing_requests=4", "--set", "num_cpus=0", "--set", "ingress_num_cpus=0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"{server}/second"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the second `alro serve` did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    yield {"proc": proc, "url": url, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _auth(key=API_KEY):
    return {"Authorization": f"Bearer {key}"}


def test_a_second_serve_refuses_to_replace_or_move_the_first(server, checkpoints):
    from alro_ray.errors import ConfigError
    from alro_ray.serve.app import run_serve

    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="application 'alro' already runs .* --app-name"):
        run_serve({"default": checkpoints["a"]}, port=port, blocking=False, **LIMITS)
    with pytest.raises(ConfigError, match="route '/' .* --route-prefix"):
        run_serve({"default": checkpoints["a"]}, port=port, blocking=False, app_name="other", **LIMITS)
    with pytest.raises(ConfigError, match=f"host and port cannot change .* --port {port}"):
        run_serve({"default": checkpoints["a"]}, port=_free_port(), blocking=False, app_name="x",
                  route_prefix="/x", **LIMITS)


def test_a_second_serve_runs_as_its_own_app_beside_the_first(second_app, client):
    url = second_app["url"]
    assert httpx.get(f"{url}/adapters", headers=_auth()).json()["adapters"][0]["name"] == "default"
    req = make_request(n_candidates=3, seed=8, mode="one-pass")
    r = httpx.post(f"{url}/rank", json=req, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["ranking"] == client.post("/rank", json=req).json()["ranking"]  # same checkpoint
    assert len(client.get("/adapters").json()["adapters"]) == 3  # the first app is untouched


def test_api_key_guards_every_route_but_the_health_checks(second_app):
    url, req = second_app["url"], make_request(n_candidates=3, seed=9)
    for headers in ({}, _auth("wrong"), {"Authorization": API_KEY}, {"X-API-Key": "s3cret"}):
        r = httpx.post(f"{url}/rank", json=req, headers=headers, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"], (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    for route in ("/adapters", "/limits", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{route}").status_code == 401, route
    for headers in (_auth(), {"X-API-Key": API_KEY}):
        assert httpx.post(f"{url}/rank", json=req, headers=headers, timeout=60).status_code == 200
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    public = httpx.get(f"{url}/stats", timeout=30).json()
    assert "requests" in public and not {"pid", "device"} & set(public)
    assert {"pid", "device"} <= set(httpx.get(f"{url}/stats", headers=_auth(), timeout=30).json())


def test_overload_gets_503_with_retry_after_and_never_500(second_app, client):
    """48 clients at once on a ranker that takes 4 and queues 2: the rest are refused at once with
    503, Retry-After and a JSON reason; every request taken is answered correctly."""
    req = make_request(n_candidates=3, seed=12, mode="one-pass")
    expected = client.post("/rank", json=req).json()["ranking"]  # the first app, same checkpoint

    async def fire():
        async with httpx.AsyncClient(timeout=120, headers=_auth()) as ac:
            return await asyncio.gather(*(ac.post(f"{second_app['url']}/rank", json=req) for _ in range(48)))

    responses = asyncio.run(fire())
    statuses = sorted({r.status_code for r in responses})
    assert statuses == [200, 503], [(r.status_code, r.text) for r in responses if r.status_code not in (200, 503)]
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"].startswith("overloaded"), r.text
        else:
            assert r.json()["ranking"] == expected


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(second_app, client):
    """Runs last of the second app's tests: SIGTERM while 2 requests wait in a batch; they are
    answered, the process exits 0, and the first app still serves."""
    import signal

    proc, url = second_app["proc"], second_app["url"]
    req = make_request(n_candidates=3, seed=13, mode="one-pass")
    expected = client.post("/rank", json=req).json()["ranking"]
    # Right after the overload test the ingress's router can still hold the ranker as full (Ray
    # Serve caches each replica's queue length) and keep new requests in its queue of 2 past the
    # SIGTERM: one answered request first, and 2 requests, not 4, so they go straight to the ranker.
    assert httpx.post(f"{url}/rank", json=req, headers=_auth(), timeout=60).status_code == 200
    time.sleep(1)

    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers=_auth()) as ac:
            sent = [asyncio.create_task(ac.post(f"{url}/rank", json=req)) for _ in range(2)]
            await asyncio.sleep(SLOW_BATCH_S / 2)  # they are in the ranker's batch, waiting for more
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 2, [r.text for r in responses]
    assert all(r.json()["ranking"] == expected for r in responses)
    assert proc.wait(timeout=120) == 0, second_app["log"].read_text()[-3000:]
    assert client.post("/rank", json=req).json()["ranking"] == expected  # the first app was left alone
    assert client.get("/second/adapters").status_code == 404  # its route went with it


# ------------------------------------------------------------------------------------------
# schema-driven fuzzing (schemathesis): no input makes the server answer 5xx
# ------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = {"POST /rank": 100}  # per generation mode; the GET routes take no input: 5


def _unique_ids(case) -> None:
    """Candidate ids must be unique, which a JSON schema cannot say: make them so in positive
    cases (a suffix per position), or most of them stop at the 422 and never reach the model."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("candidates"), list):
        for j, c in enumerate(body["candidates"]):
            if isinstance(c, dict) and isinstance(c.get("id"), str):
                c["id"] = f"{c['id'][:100]}#{j}"
            elif isinstance(c, dict) and isinstance(c.get("id"), int):
                c["id"] = c["id"] * 64 + j if abs(c["id"]) < 2 ** 50 else j


def test_fuzz_openapi_no_server_errors(server):
    """schemathesis: valid (positive) and schema-violating (negative) requests for every operation
    of /openapi.json; no 5xx, and status codes, content types and bodies as the schema declares."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    statuses: dict[tuple, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES.get(label, 5), deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def run(case):
                if mode == GenerationMode.POSITIVE:
                    _unique_ids(case)
                response = case.call_and_validate(timeout=60, checks=checks)
                key = (label, mode.value, response.status_code)
                statuses[key] = statuses.get(key, 0) + 1

            run()
    print("fuzz (operation, mode, status): count", statuses)
    assert all(status < 500 for _, _, status in statuses)
    ranked = statuses.get(("POST /rank", "positive", 200), 0)
    rejected = sum(n for (label, mode, st), n in statuses.items() if mode == "negative" and st >= 400)
    assert ranked >= 20 and rejected >= 50, statuses
    with httpx.Client(base_url=server, timeout=60) as c:  # still serving
        assert c.post("/rank", json=make_request()).status_code == 200
