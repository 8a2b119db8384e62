"""The ingress's FastAPI app: the body-size limit, every error as JSON, the routes (`routes`)."""

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alro_ray.serve.auth import ApiKey, ApiKeyMiddleware
from alro_ray.serve.registry import AdapterEntry
from alro_ray.rank.recommend import Catalogue
from alro_ray.serve.routes import add_info_routes, add_rank_route, add_recommend_route, json_error
from alro_ray.serve.schemas import make_schemas, safe_text
from alro_ray.serve.settings import ServeSettings

log = logging.getLogger("alro_ray")


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`; an HTTPException, so FastAPI passes it on (other errors become a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 with a JSON body for requests over `limit` bytes (Content-Length or streamed); 415 for a
    compressed body (Content-Encoding: nothing here decompresses it, so it could not be read)."""

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
            elif key == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                encoding = safe_text(value.decode("latin-1"), 40)
                return await JSONResponse({"error": f"request bodies are read as sent, not decompressed: send "
                                                    f"it without Content-Encoding {encoding!r}"},
                                          status_code=415)(scope, receive, send)
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON: invalid JSON (400), schema violations (422), HTTP errors, bugs (500)."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            e = next(e for e in errs if e.get("type") == "json_invalid")
            where = e.get("loc", ("body", "?"))[-1]
            msg = (e.get("ctx") or {}).get("error", "JSON decode error")
            return json_error(400, f"invalid JSON at character {where}: {msg}")
        summary = "; ".join(
            f"{'.'.join(str(x) for x in _loc(e.get('loc', ())))}: {e.get('msg', '')}" for e in errs[:5])
        if len(errs) > 5:
            summary += f"; and {len(errs) - 5} more"
        return json_error(422, f"invalid request: {summary}", _validation_detail(errs))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):  # a bug: still JSON, and logged
        log.exception("unexpected error on %s", request.url.path)
        return json_error(500, f"internal error: {type(exc).__name__}")


def _error_responses(error_body: type) -> dict:
    """The error statuses of POST /rank, for the OpenAPI document."""
    return {code: {"model": error_body, "description": text} for code, text in
            [(400, "invalid JSON"), (401, "an API key is set and the request did not carry it"),
             (404, "unknown adapter (or, for /recommend, unknown user)"), (413, "request body too large"),
             (415, "a compressed request body"),
             (422, "request does not match the schema or the limits"),
             (500, "the adapter is broken (non-finite weights or scores), or an internal error"),
             (503, "overloaded (the ranker's queue is full), or the ranker replica died and none answered "
                   "within the retry budget: retry after Retry-After seconds"),
             (504, "the ranker did not answer within request_timeout_s")]}


def make_fastapi_app(settings: ServeSettings, registry: dict[str, AdapterEntry], ranker,
                     api_key: ApiKey | None = None) -> FastAPI:
    """The ingress's app: the schemas from the limits, the API key (if one is set), the body-size
    limit, JSON errors, the routes. Adapters trained on top-N lists bring their catalogue (the
    retriever, its users' ratings, the items' text: /recommend retrieves in the ingress)."""
    catalogues = {name: Catalogue(e.path) for name, e in registry.items() if e.info.protocol == "topn"}
    schemas = make_schemas(settings, max(e.candidates for e in registry.values()))
    app = FastAPI(
        title="ALRO ranker",
        version="1.0",
        description="List-wise LLM ranking of candidate items from a user's history (ALRO). "
                    f"Limits: history <= {settings.max_history} items, titles <= "
                    f"{settings.max_title_chars} chars, attributes <= {settings.max_attribute_chars} "
                    f"chars, body <= {settings.max_body_bytes} bytes, candidates 2..C of the adapter.",
    )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, key=api_key or ApiKey(None))  # added last: runs first
    add_error_handlers(app)
    add_rank_route(app, settings, registry, ranker, schemas, _error_responses(schemas["ErrorBody"]))
    add_recommend_route(app, settings, registry, ranker, catalogues, schemas, _error_responses(schemas["ErrorBody"]))
    add_info_routes(app, settings, registry, ranker)
    return app
