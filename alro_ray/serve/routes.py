"""The ingress's routes: a request becomes a RankJob for the ranker deployment, its outcome the answer."""

import asyncio
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError

from alro_ray.data.prompts import Item
from alro_ray.errors import AlroError
from alro_ray.rank.recommend import Catalogue, UnknownUser, retrieve
from alro_ray.serve.contract import RankFailure, RankJob, RankOutcome
from alro_ray.serve.registry import AdapterEntry
from alro_ray.serve.retry import ReplicaLost, call_with_retry
from alro_ray.serve.schemas import safe_text
from alro_ray.serve.settings import ServeSettings

log = logging.getLogger("alro_ray")

LIMIT_KEYS = ("max_history", "max_title_chars", "max_attribute_chars", "max_id_chars", "max_body_bytes",
              "max_prompt_tokens", "max_batch_size", "batch_wait_timeout_s", "request_timeout_s")
PRIVATE_STATS = ("pid", "device", "torch_threads")  # about the host: shown only with the API key, when one is set


def json_error(status: int, message: str, detail: list | None = None, retry_after_s: int | None = None
               ) -> JSONResponse:
    """Every error the service sends: `{"error": what is wrong, "detail": [...]}`; a 503 says when
    to come back (Retry-After)."""
    body: dict[str, Any] = {"error": safe_text(message, 2000)}
    if detail is not None:
        body["detail"] = detail
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def nonfinite_scores(adapter: str) -> str:
    """The error body for a model that produced NaN/inf: an order from those scores would be noise."""
    return (f"the ranker produced non-finite scores (NaN/inf): the adapter {adapter!r} is broken; "
            f"retrain it (or replace its checkpoint) and restart the app; other adapters still answer")


def rank_job(req, name: str, mode: str, entry: AdapterEntry) -> RankJob:
    """The validated request as the ranker deployment takes it; raises ValueError (a 422) for a
    fusion that has no weight to use."""
    f = req.fusion
    return RankJob(
        adapter=name, mode=mode,
        history=[(Item(h.title, h.attributes), h.rating) for h in req.history],
        candidates=[Item(c.title, c.attributes) for c in req.candidates],
        # for hints: the saved fit's values by id, unless the request passes its own
        candidate_ids=[c.id for c in req.candidates],
        candidate_hints=[c.hints.model_dump(exclude_none=True) if c.hints else None for c in req.candidates],
        history_ids=[h.id for h in req.history],
        fusion=entry.fusion_settings(mode, f.classical, f.weight, f.method) if f else None)


async def ask_ranker(ranker, job: RankJob, settings: ServeSettings) -> RankOutcome | JSONResponse:
    """The ranker's outcome, or the error answer: overloaded or a replica lost for good (503 with
    Retry-After), no answer in request_timeout_s (504), a failure the ranker reported, a bug (500)."""
    def call():
        return ranker.options(multiplexed_model_id=job.adapter).rank.remote(job)

    try:
        out = await asyncio.wait_for(call_with_retry(call, settings.retry_attempts, settings.retry_budget_s),
                                     timeout=settings.request_timeout_s)
    except BackPressureError as e:  # the ranker's queue is full: refused at once, nothing was run
        return json_error(503, f"overloaded: the ranker's queue is full ({e.message}); retry in "
                               f"{settings.retry_after_s} s", retry_after_s=settings.retry_after_s)
    except ReplicaLost as e:  # the replica died and none came back in time
        log.error("ranker lost under a request: %s", e)
        return json_error(503, f"ranker unavailable: {e}; retry later", retry_after_s=settings.retry_after_s)
    except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on, not before
        return json_error(504, f"the ranker did not answer within request_timeout_s = "
                               f"{settings.request_timeout_s:g} s")
    except Exception as e:  # a bug in the ranker: this request only
        log.exception("ranker call failed")
        return json_error(500, f"internal error in the ranker: {type(e).__name__}")
    if isinstance(out, RankFailure):
        return json_error(out.status, out.error)
    if not all(math.isfinite(s) for s in out.scores):  # the ranker checks this too: never an order
        return json_error(500, nonfinite_scores(job.adapter))
    return out


def adapter_of(req, settings: ServeSettings, registry: dict[str, AdapterEntry]) -> tuple[str, AdapterEntry | None]:
    """The adapter a request names (default: the settings'), and its entry (None: unknown, a 404)."""
    name = req.adapter if req.adapter is not None else settings.default_name
    return name, registry.get(name)


def answer(out: RankOutcome, ids: list, name: str, mode: str) -> dict:
    """The response body: candidate ids best first and each one's score."""
    return {"ranking": [ids[j] for j in out.order],
            "scores": {str(i): float(s) for i, s in zip(ids, out.scores)},
            "adapter": name, "mode": mode, "fusion": out.fusion.echo() if out.fusion else None,
            "batch_size": out.batch_size}


def add_rank_route(app: FastAPI, settings: ServeSettings, registry: dict[str, AdapterEntry], ranker,
                   schemas: dict[str, type], responses: dict) -> None:
    RankRequest = schemas["RankRequest"]

    @app.post("/rank", response_model=schemas["RankResponse"], responses=responses,
              summary="Rank candidate items for a user history")
    async def rank(req: RankRequest):
        name, entry = adapter_of(req, settings, registry)
        if entry is None:
            return json_error(404, f"unknown adapter {safe_text(name, 80)!r}; available: {sorted(registry)}")
        if len(req.candidates) > entry.candidates:
            return json_error(422, f"adapter {name!r} was trained with C={entry.candidates} identifiers: "
                                   f"send 2 to {entry.candidates} candidates, got {len(req.candidates)}")
        mode = req.mode or settings.default_mode
        try:
            job = rank_job(req, name, mode, entry)
        except ValueError as e:
            return json_error(422, str(e))
        out = await ask_ranker(ranker, job, settings)
        if isinstance(out, JSONResponse):
            return out
        return answer(out, [c.id for c in req.candidates], name, mode)


def recommend_job(req, name: str, mode: str, catalogue: Catalogue, entry: AdapterEntry) -> RankJob:
    """Retrieve the adapter's C candidates for the request's user or rated history (rank/recommend.py)
    and show them as training did: the last H rated items, the retriever's score among the hints.
    Raises UnknownUser (404) or AlroError (422)."""
    if req.user is not None:
        items, ratings = catalogue.history_of(str(req.user))
    else:
        items, ratings = [str(h.id) for h in req.history], [h.rating for h in req.history]
    candidates, scores = retrieve(catalogue, items, entry.candidates)
    shown = list(zip(items, ratings))[-entry.info.history:]
    return RankJob(adapter=name, mode=mode, history=[(catalogue.item(i), r) for i, r in shown],
                   candidates=[catalogue.item(c) for c in candidates], candidate_ids=candidates,
                   candidate_hints=[{"retriever_score": s} for s in scores], history_ids=[i for i, _ in shown],
                   texts_as_trained=True)  # the catalogue's texts are the prepared ones, cut already


def add_recommend_route(app: FastAPI, settings: ServeSettings, registry: dict[str, AdapterEntry], ranker,
                        catalogues: dict[str, Catalogue], schemas: dict[str, type], responses: dict) -> None:
    RecommendRequest = schemas["RecommendRequest"]

    @app.post("/recommend", response_model=schemas["RecommendResponse"], responses=responses,
              summary="Retrieve from the catalogue, rerank, return the top k (adapters trained on top-N lists)")
    async def recommend(req: RecommendRequest):
        name, entry = adapter_of(req, settings, registry)
        if entry is None:
            return json_error(404, f"unknown adapter {safe_text(name, 80)!r}; available: {sorted(registry)}")
        catalogue = catalogues.get(name)
        if catalogue is None:
            return json_error(422, f"adapter {name!r} was not trained on the top-N protocol (data.protocol topn): "
                                   f"it has no retriever to recommend from; POST /rank ranks given candidates")
        k = req.k if req.k is not None else min(10, entry.candidates)
        if k > entry.candidates:
            return json_error(422, f"k={k}: adapter {name!r} reranks C={entry.candidates} retrieved items")
        mode = req.mode or settings.default_mode
        try:
            job = recommend_job(req, name, mode, catalogue, entry)
        except UnknownUser as e:
            return json_error(404, str(e))
        except AlroError as e:
            return json_error(422, str(e))
        out = await ask_ranker(ranker, job, settings)
        if isinstance(out, JSONResponse):
            return out
        best = out.order[:k]
        return {"items": [job.candidate_ids[j] for j in best],
                "scores": {job.candidate_ids[j]: float(out.scores[j]) for j in best},
                "retrieved": job.candidate_ids, "adapter": name, "mode": mode, "batch_size": out.batch_size}


def add_info_routes(app: FastAPI, settings: ServeSettings, registry: dict[str, AdapterEntry], ranker) -> None:
    @app.get("/healthz", summary="Liveness: the ingress answers (never waits for ranking)")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a ranker replica answers a ping (503 while none can)")
    async def readyz():
        try:
            await asyncio.wait_for(ranker.ping.remote(), timeout=10)
        except BackPressureError:
            return json_error(503, "not ready: the ranker's queue is full", retry_after_s=settings.retry_after_s)
        except Exception as e:
            return json_error(503, f"ranker not ready: {type(e).__name__}", retry_after_s=settings.retry_after_s)
        return {"status": "ready"}

    @app.get("/adapters", summary="Registered adapter names (request field `adapter`)")
    async def adapters():
        return {"default": settings.default_name, "default_mode": settings.default_mode,
                "adapters": [e.public() for e in registry.values()]}

    @app.get("/stats", summary="Batch-size histogram of one ranker replica (pid and device need the API key)")
    async def stats(request: Request):
        try:
            out = await asyncio.wait_for(ranker.stats.remote(), timeout=10)
        except Exception as e:
            return json_error(503, f"ranker not ready: {type(e).__name__}", retry_after_s=settings.retry_after_s)
        if not getattr(request.state, "authorized", True):  # an API key is set and was not sent
            out = {k: v for k, v in out.items() if k not in PRIVATE_STATS}
        return out

    @app.get("/limits", summary="Request limits in force")
    async def limits():
        return {k: getattr(settings, k) for k in LIMIT_KEYS} | {
            "candidates": {e.name: e.candidates for e in registry.values()}}
