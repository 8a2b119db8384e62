"""The HTTP side of the ingress: FastAPI routes, the body-size limit, every error as JSON."""

import asyncio
import logging
import math
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alro_ray.serve.registry import AdapterEntry
from alro_ray.serve.retry import ReplicaLost, call_with_retry
from alro_ray.serve.schemas import make_schemas, safe_text
from alro_ray.serve.settings import ServeSettings

log = logging.getLogger("alro_ray")


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`; an HTTPException, so FastAPI passes it on (other errors become a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 with a JSON body for requests over `limit` bytes (Content-Length or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"error": f"request body over the limit of {self.limit} bytes"},
                                 status_code=413)
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await JSONResponse({"error": "invalid Content-Length header"},
                                              status_code=400)(scope, receive, send)
                if length > self.limit:
                    return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await too_large(scope, receive, send)


def nonfinite_scores(adapter: str) -> str:
    """The error body for a model that produced NaN/inf: an order from those scores would be noise."""
    return (f"the ranker produced non-finite scores (NaN/inf): the adapter {adapter!r} is broken; "
            f"retrain it (or replace its checkpoint) and restart the app; other adapters still answer")


def _error(status: int, message: str, detail: list | None = None):
    body: dict[str, Any] = {"error": safe_text(message, 2000)}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _loc(loc) -> list:
    """A field path without pydantic's union-branch tags ("function-after[...]", "constrained-int")."""
    return [safe_text(x, 80) if isinstance(x, str) else x for x in loc
            if not (isinstance(x, str) and ("[" in x or x.startswith(("constrained-", "function-"))))]


def _validation_detail(errors) -> list[dict]:
    out = []
    for e in errors[:20]:
        out.append({"loc": _loc(e.get("loc", ())),
                    "msg": safe_text(e.get("msg", ""), 300), "type": safe_text(e.get("type", ""), 80)})
    return out


def make_fastapi_app(settings: ServeSettings, registry: dict[str, AdapterEntry], ranker):
    max_c = max(e.candidates for e in registry.values())
    schemas = make_schemas(settings, max_c)
    RankRequest, RankResponse, ErrorBody = schemas["RankRequest"], schemas["RankResponse"], schemas["ErrorBody"]
    errors = {code: {"model": ErrorBody, "description": text} for code, text in
              [(400, "invalid JSON"), (404, "unknown adapter"), (413, "request body too large"),
               (422, "request does not match the schema or the limits"),
               (500, "the adapter is broken (non-finite weights or scores), or an internal error"),
               (503, "the ranker replica died and none answered within the retry budget")]}

    app = FastAPI(
        title="ALRO ranker",
        version="1.0",
        description="List-wise LLM ranking of candidate items from a user's history (ALRO). "
                    f"Limits: history <= {settings.max_history} items, titles <= "
                    f"{settings.max_title_chars} chars, attributes <= {settings.max_attribute_chars} "
                    f"chars, body <= {settings.max_body_bytes} bytes, candidates 2..C of the adapter.",
    )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            e = next(e for e in errs if e.get("type") == "json_invalid")
            where = e.get("loc", ("body", "?"))[-1]
            msg = (e.get("ctx") or {}).get("error", "JSON decode error")
            return _error(400, f"invalid JSON at character {where}: {msg}")
        summary = "; ".join(
            f"{'.'.join(str(x) for x in _loc(e.get('loc', ())))}: {e.get('msg', '')}" for e in errs[:5])
        if len(errs) > 5:
            summary += f"; and {len(errs) - 5} more"
        return _error(422, f"invalid request: {summary}", _validation_detail(errs))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):  # a bug: still JSON, and logged
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.post("/rank", response_model=RankResponse, responses=errors,
              summary="Rank candidate items for a user history")
    async def rank(req: RankRequest):
        name = req.adapter if req.adapter is not None else settings.default_name
        entry = registry.get(name)
        if entry is None:
            return _error(404, f"unknown adapter {safe_text(name, 80)!r}; available: {sorted(registry)}")
        if len(req.candidates) > entry.candidates:
            return _error(422, f"adapter {name!r} was trained with C={entry.candidates} identifiers: "
                               f"send 2 to {entry.candidates} candidates, got {len(req.candidates)}")
        mode = req.mode or settings.default_mode
        try:
            fusion = entry.fusion_settings(mode, req.fusion.model_dump()) if req.fusion else None
        except ValueError as e:
            return _error(422, str(e))
        payload = {
            "adapter": name,
            "mode": mode,
            "history": [[h.title, h.attributes, h.rating] for h in req.history],
            "candidates": [[c.title, c.attributes] for c in req.candidates],
            # For hints: the saved fit's values by id, unless the request passes its own.
            "candidate_ids": [c.id for c in req.candidates],
            "candidate_hints": [c.hints.model_dump(exclude_none=True) if c.hints else None for c in req.candidates],
            "history_ids": [h.id for h in req.history],
            "fusion": fusion,
        }
        try:
            out = await call_with_retry(lambda: ranker.options(multiplexed_model_id=name).rank.remote(payload),
                                        settings.retry_attempts, settings.retry_budget_s)
        except ReplicaLost as e:  # the replica died and none came back in time
            log.error("ranker lost under a request: %s", e)
            return _error(503, f"ranker unavailable: {e}; retry later")
        except Exception as e:  # a bug in the ranker: this request only
            log.exception("ranker call failed")
            return _error(500, f"internal error in the ranker: {type(e).__name__}")
        if "error" in out:
            return _error(out.get("status", 500), out["error"])
        if not all(math.isfinite(s) for s in out["scores"]):  # the ranker checks this too: never an order
            return _error(500, nonfinite_scores(name))
        ids = [c.id for c in req.candidates]
        return {"ranking": [ids[j] for j in out["order"]],
                "scores": {str(i): float(s) for i, s in zip(ids, out["scores"])},
                "adapter": name, "mode": mode, "fusion": out.get("fusion"), "batch_size": out["batch_size"]}

    @app.get("/healthz", summary="Liveness: the ingress and a ranker replica answer")
    async def healthz():
        try:
            await asyncio.wait_for(ranker.ping.remote(), timeout=10)
        except Exception as e:
            return _error(503, f"ranker not ready: {type(e).__name__}")
        return {"status": "ok"}

    @app.get("/adapters", summary="Registered adapter names (request field `adapter`)")
    async def adapters():
        return {"default": settings.default_name, "default_mode": settings.default_mode,
                "adapters": [e.public() for e in registry.values()]}

    @app.get("/stats", summary="Batch-size histogram of one ranker replica")
    async def stats():
        try:
            return await asyncio.wait_for(ranker.stats.remote(), timeout=10)
        except Exception as e:
            return _error(503, f"ranker not ready: {type(e).__name__}")

    @app.get("/limits", summary="Request limits in force")
    async def limits():
        keys = ("max_history", "max_title_chars", "max_attribute_chars", "max_id_chars",
                "max_body_bytes", "max_prompt_tokens", "max_batch_size", "batch_wait_timeout_s")
        return {k: getattr(settings, k) for k in keys} | {
            "candidates": {e.name: e.candidates for e in registry.values()}}

    return app
