"""Serving trained rankers over HTTP with Ray Serve.

Two deployments (see docs/serving.md):

  ingress  FastAPI app: request schema (pydantic, so /openapi.json is accurate), limits, errors as
           JSON 4xx, routing by adapter name. No model here.
  ranker   one base model per replica with several LoRA adapters on it, loaded on demand by name
           through Serve model multiplexing (`@serve.multiplexed`, LRU per replica), and dynamic
           request batching (`@serve.batch`): a batch is split into groups of the same adapter,
           mode and candidate count, each ranked in one forward pass.

Adapters come from a registry fixed at start (name -> checkpoint directory, `alro_ray.model.checkpoint`
format). A request names an adapter, never a path; every adapter of one registry must share the
base model (checked at start, before anything is deployed).

The code lives in the installed package (not in `serve/`) so that every Ray worker, on any node,
can import it: `serve/config.yaml` points at `alro_ray.serve.app:build_app`.

Entry points:
  build_app(args)                Serve application builder (`serve run serve/config.yaml`)
  run_serve(adapters, ...)       start a local (or RAY_ADDRESS) Ray and Serve; what `alro serve` calls
  adapters_from_args(...)        `--checkpoint DIR` / `--adapter name=DIR` -> registry dict
"""

import asyncio
import dataclasses
import logging
import math
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from alro_ray.errors import AlroError, ConfigError

log = logging.getLogger("alro_ray")

APP_NAME = "alro"
MODES = ("generate", "one-pass")  # same names as alro_ray.rank.ranking.MODES
MAX_ATTRIBUTE_ITEMS = 20  # attributes given as a list: at most this many, each <= max_attribute_chars
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------------------------
# Settings and the adapter registry
# --------------------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    """Everything `build_app` / `run_serve` accept besides the HTTP host and port.

    Limits are checked by the ingress before any model work; a request over one gets a 4xx.
    """

    adapters: dict[str, str] = field(default_factory=dict)  # name -> checkpoint directory
    default_adapter: str | None = None  # None: "default" if registered, else the first name
    default_mode: Literal["generate", "one-pass"] = "generate"
    # request limits
    max_history: int = 50  # history items per request
    max_title_chars: int = 200
    max_attribute_chars: int = 200
    max_id_chars: int = 128
    max_body_bytes: int = 1_048_576  # 413 above this
    max_prompt_tokens: int = 4096  # rendered prompt length; 422 above this
    # batching (ranker deployment; also settable at run time through its user_config)
    max_batch_size: int = 8  # 1 = batching off
    batch_wait_timeout_s: float = 0.01
    max_adapters_per_replica: int = 4  # LRU of loaded adapters per ranker replica
    # placement; None leaves it to Serve / the YAML `deployments:` section
    num_replicas: int | None = None  # ranker replicas
    num_cpus: float | None = None  # per ranker replica
    num_gpus: float | None = None  # per ranker replica; > 0 runs the model on CUDA
    ingress_num_cpus: float | None = None
    max_ongoing_requests: int | None = None  # per ranker replica; None: 4 x max_batch_size
    ingress_max_ongoing_requests: int | None = None  # None: 256
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = None  # None: the replica's CPU count (at least 1)
    base_dir: str | None = None  # relative adapter paths are resolved against it (default: cwd)

    @classmethod
    def from_dict(cls, data: dict) -> "ServeSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {unknown}; known: {sorted(known)}")
        settings = cls(**data)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ConfigError("serve: `adapters` must map at least one adapter name to a checkpoint directory")
        for name, path in self.adapters.items():
            if not isinstance(name, str) or not ADAPTER_NAME.match(name):
                raise ConfigError(f"serve: adapter name {name!r} must match {ADAPTER_NAME.pattern}")
            if not isinstance(path, (str, Path)) or not str(path):
                raise ConfigError(f"serve: adapter {name!r} needs a checkpoint directory, got {path!r}")
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ConfigError(f"serve: default_adapter {self.default_adapter!r} is not in adapters "
                              f"{sorted(self.adapters)}")
        if self.default_mode not in MODES:
            raise ConfigError(f"serve: default_mode must be one of {MODES}, got {self.default_mode!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"serve: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        positive = ("max_history", "max_title_chars", "max_attribute_chars", "max_id_chars",
                    "max_body_bytes", "max_prompt_tokens", "max_batch_size", "max_adapters_per_replica")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"serve: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or not 0 <= self.batch_wait_timeout_s <= 10:
            raise ConfigError(f"serve: batch_wait_timeout_s must be in [0, 10] seconds, "
                              f"got {self.batch_wait_timeout_s!r}")
        for name in ("num_replicas", "max_ongoing_requests", "ingress_max_ongoing_requests", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"serve: {name} must be an integer >= 1, got {value!r}")
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"serve: {name} must be >= 0, got {value!r}")

    @property
    def default_name(self) -> str:
        if self.default_adapter:
            return self.default_adapter
        return "default" if "default" in self.adapters else next(iter(self.adapters))


@dataclass(frozen=True)
class AdapterEntry:
    """One registry entry, read from the checkpoint's ranker.json and config.yaml at start."""

    name: str
    path: str  # absolute checkpoint directory (never shown to clients)
    info: dict  # ranker.json
    model: dict  # the `model:` section of its training config

    @property
    def candidates(self) -> int:
        return int(self.info["candidates"])

    def public(self) -> dict:
        return {"name": self.name, "base_model": self.info["base_model"], "candidates": self.candidates,
                "history": self.info.get("history"), "domain_plural": self.info.get("domain_plural"),
                "attribute_name": self.info.get("attribute_name")}


def _base_key(entry: AdapterEntry) -> dict:
    """What must be equal for two adapters to sit on one base model."""
    model = entry.model
    key = {"base_model": entry.info.get("base_model"), "model.name": model.get("name"),
           "model.tokenizer": model.get("tokenizer"), "tokenizer": entry.info.get("tokenizer")}
    if model.get("name") == "tiny-random":  # its weights come from the shape and seed
        key["model.tiny"] = model.get("tiny")
    return key


def load_registry(adapters: dict[str, str], base_dir: str | None = None) -> dict[str, AdapterEntry]:
    """Check every checkpoint of the registry and that they share one base model."""
    from alro_ray.model.checkpoint import check_ranker_dir
    from alro_ray.config import read_yaml

    root = Path(base_dir) if base_dir else Path.cwd()
    registry: dict[str, AdapterEntry] = {}
    for name, raw in adapters.items():
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        try:
            info = check_ranker_dir(path)
        except AlroError as e:
            raise ConfigError(f"serve: adapter {name!r}: {e}") from e
        model = read_yaml(path / "config.yaml").get("model") or {}
        registry[name] = AdapterEntry(name, str(path), info, model)
    entries = list(registry.values())
    first = entries[0]
    for other in entries[1:]:
        a, b = _base_key(first), _base_key(other)
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise ConfigError(
                f"serve: adapters {first.name!r} and {other.name!r} have different base models "
                f"({diff}); all adapters of one registry must share a base model: serve them as "
                f"separate applications"
            )
    return registry


def adapters_from_args(checkpoint: str | None = None, adapter: list[str] | None = None) -> dict[str, str]:
    """`--checkpoint DIR` (adapter name "default") and repeated `--adapter name=DIR` -> registry."""
    adapters: dict[str, str] = {}
    if checkpoint:
        adapters["default"] = checkpoint
    for text in adapter or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects name=DIR, got {text!r}")
        if name in adapters:
            raise ConfigError(f"adapter {name!r} given twice")
        adapters[name] = path
    if not adapters:
        raise ConfigError("give --checkpoint DIR or at least one --adapter name=DIR")
    return adapters


# --------------------------------------------------------------------------------------------
# Request schema (pydantic models built from the limits, so the OpenAPI schema shows them)
# --------------------------------------------------------------------------------------------


def _safe_text(value: Any, limit: int = 300) -> str:
    """A string that can always be JSON-encoded as UTF-8 (no lone surrogates), cut to `limit`."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clean(value: str) -> str:
    """Collapse whitespace (newlines could forge template lines) and reject non-encodable text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogate code points)") from None
    return " ".join(value.split())


def _nonblank(value: str) -> str:
    value = _clean(value)
    if not value:
        raise ValueError("must not be empty or only whitespace")
    return value


def _not_bool(value: Any) -> Any:
    """Integer ids: 7 and 7.0 (JSON Schema integers), never true/false."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string or an integer, not a boolean")
    return value


def make_schemas(settings: ServeSettings, max_candidates: int) -> dict[str, type]:
    from typing import Annotated, Optional, Union

    from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, model_validator

    s = settings
    Title = Annotated[StrictStr, Field(min_length=1, max_length=s.max_title_chars, pattern=r"\S",
                                       description="item title (whitespace runs are collapsed)"),
                      AfterValidator(_nonblank)]
    AttrStr = Annotated[StrictStr, Field(max_length=s.max_attribute_chars), AfterValidator(_clean)]
    AttrList = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=s.max_attribute_chars,
                                                         pattern=r"\S"), AfterValidator(_nonblank)]],
                         Field(max_length=MAX_ATTRIBUTE_ITEMS)]
    Attributes = Annotated[Union[AttrStr, AttrList], Field(
        description='e.g. "Action|Sci-Fi", or ["Action", "Sci-Fi"] (joined with "|"); '
                    f'a string or each list item <= {s.max_attribute_chars} characters')]
    CandidateId = Union[Annotated[StrictStr, Field(min_length=1, max_length=s.max_id_chars, pattern=r"\S"),
                                  AfterValidator(_nonblank)],
                        Annotated[int, BeforeValidator(_not_bool), Field(ge=-(2 ** 63), le=2 ** 63 - 1)]]
    Rating = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]

    def joined(attrs) -> str:
        return attrs if isinstance(attrs, str) else "|".join(attrs)

    class HistoryItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        title: Title
        attributes: Attributes = ""
        rating: Optional[Rating] = Field(None, description="the user's rating; left out of the prompt if null")

        @model_validator(mode="after")
        def _attrs(self):
            self.attributes = joined(self.attributes)
            return self

    class Candidate(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: CandidateId = Field(description="returned in `ranking`; unique within the request")
        title: Title
        attributes: Attributes = ""

        @model_validator(mode="after")
        def _attrs(self):
            self.attributes = joined(self.attributes)
            return self

    class RankRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})
        history: list[HistoryItem] = Field(min_length=1, max_length=s.max_history,
                                           description="items the user interacted with, oldest first")
        candidates: list[Candidate] = Field(
            min_length=2, max_length=max_candidates,
            description="items to rank; at most the adapter's trained candidate count C (GET /adapters)")
        mode: Optional[Literal["generate", "one-pass"]] = Field(
            None, description=f"ranking mode; default {s.default_mode!r}")
        adapter: Optional[StrictStr] = Field(None, max_length=64,
                                             description=f"adapter name (GET /adapters); default {s.default_name!r}")

        @model_validator(mode="after")
        def _unique_ids(self):
            seen: set[str] = set()
            dups = []
            for c in self.candidates:
                key = str(c.id)
                if key in seen:
                    dups.append(key)
                seen.add(key)
            if dups:
                raise ValueError(f"duplicate candidate ids: {sorted(set(dups))[:10]}")
            return self

    class RankResponse(BaseModel):
        ranking: list[Union[str, int]] = Field(description="candidate ids, best first")
        scores: dict[str, Optional[float]] = Field(
            description="per candidate id: one-pass = log-probability of being ranked first; "
                        "generate = minus the rank (higher is better)")
        adapter: str
        mode: str
        batch_size: int = Field(description="requests in the server-side batch this one ran in")

    class ErrorBody(BaseModel):
        error: str = Field(description="what is wrong")
        detail: Optional[list[dict[str, Any]]] = Field(None, description="per-field validation errors")

    return {"HistoryItem": HistoryItem, "Candidate": Candidate, "RankRequest": RankRequest,
            "RankResponse": RankResponse, "ErrorBody": ErrorBody}


EXAMPLE_REQUEST = {
    "history": [
        {"title": "The Matrix (1999)", "attributes": "Action|Sci-Fi", "rating": 5},
        {"title": "Toy Story (1995)", "attributes": "Animation|Children's|Comedy", "rating": 3},
    ],
    "candidates": [
        {"id": "m1", "title": "Alien (1979)", "attributes": "Horror|Sci-Fi"},
        {"id": "m2", "title": "Babe (1995)", "attributes": "Children's|Comedy|Drama"},
        {"id": "m3", "title": "Heat (1995)", "attributes": "Action|Crime|Thriller"},
    ],
    "mode": "generate",
}


# --------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------

class _AdapterRef:
    """What the multiplexed loader returns; Serve calls __del__ when it evicts the adapter (LRU).

    Eviction only marks the adapter: it is deleted from the shared model by the next load, under
    the model lock, so a batch that is running never loses its weights.
    """

    def __init__(self, owner: "RankerDeployment", name: str):
        self.owner, self.name, self._released = owner, name, False

    def __del__(self):
        if not self._released:
            self._released = True
            self.owner._evicted.add(self.name)


@serve.deployment(name="ranker")
class RankerDeployment:
    """One base model, several LoRA adapters on it (multiplexed by name), batched ranking."""

    def __init__(self, settings: ServeSettings, registry: dict[str, AdapterEntry]):
        import torch

        from alro_ray.config import ModelConfig, from_dict
        from alro_ray.model.loading import load_base_model

        self.settings = settings
        self.registry = registry
        threads = settings.torch_threads
        if threads is None:  # the CPUs Ray gave this replica (YAML ray_actor_options or num_cpus=)
            try:
                import ray

                threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            except Exception:
                threads = 1
        torch.set_num_threads(max(1, threads))
        use_cuda = bool(settings.num_gpus) and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        dtype = getattr(torch, settings.dtype)
        first = next(iter(registry.values()))
        model_cfg = from_dict(ModelConfig, first.model)
        self.base = load_base_model(model_cfg, dtype).to(self.device)
        self.peft = None
        self.loaded: list[str] = []
        self.rankers: dict[str, Any] = {}  # name -> alro_ray.model.checkpoint.Ranker sharing self.peft
        self._lock = threading.Lock()  # one forward at a time; guards set_adapter/load/delete
        self._evicted: set[str] = set()
        self._stats_lock = threading.Lock()
        self.batch_sizes: Counter = Counter()  # requests per @serve.batch call
        self.group_sizes: Counter = Counter()  # prompts per forward pass
        self.requests = 0
        self.adapter_loads = 0
        self.busy_s = 0.0  # time spent ranking batches (prompt rendering included)
        self.started = time.time()
        k = settings.max_adapters_per_replica

        async def load(name: str) -> _AdapterRef:  # multiplexed: LRU cache of adapters
            return await self._load_adapter(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=k)(load)
        self.reconfigure({"max_batch_size": settings.max_batch_size,
                          "batch_wait_timeout_s": settings.batch_wait_timeout_s})
        with self._lock:  # the default adapter is ready before the replica reports healthy
            self._attach(settings.default_name)

    def reconfigure(self, config: dict) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; changes batching without restarting."""
        config = config or {}
        if "max_batch_size" in config:
            self.settings.max_batch_size = int(config["max_batch_size"])
            self._batched.set_max_batch_size(self.settings.max_batch_size)
        if "batch_wait_timeout_s" in config:
            self.settings.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
            self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    # -- adapters ------------------------------------------------------------------------------

    async def _load_adapter(self, name: str) -> _AdapterRef:
        if name not in self.registry:  # never a path: only names fixed at start
            raise KeyError(f"unknown adapter {name!r}")

        def attach():
            with self._lock:
                self._attach(name)

        await asyncio.to_thread(attach)
        return _AdapterRef(self, name)

    def _attach(self, name: str) -> None:
        """Load adapter `name` into the shared model (caller holds the lock)."""
        from peft import PeftModel
        from transformers import AutoTokenizer

        from alro_ray.model.checkpoint import Ranker
        from alro_ray.config import Config, from_dict, read_yaml
        from alro_ray.data.tokenize import RankTokenizer

        entry = self.registry[name]
        self._evicted.discard(name)
        adapter_dir = str(Path(entry.path) / "adapter")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
            self.adapter_loads += 1
        elif name not in self.peft.peft_config:
            self.peft.load_adapter(adapter_dir, adapter_name=name)
            self.adapter_loads += 1
        self.peft.to(self.device).eval()
        for old in list(self._evicted):  # free adapters Serve's LRU let go of
            if old in self.peft.peft_config and len(self.peft.peft_config) > 1:
                self.peft.delete_adapter(old)
                self.rankers.pop(old, None)
            self._evicted.discard(old)
        if name not in self.rankers:
            tok = AutoTokenizer.from_pretrained(Path(entry.path) / "tokenizer")
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            rank_tok = RankTokenizer(tok, entry.candidates)
            if rank_tok.identifier_ids != entry.info["identifier_ids"]:
                raise AlroError(f"adapter {name!r}: the saved tokenizer's identifier ids differ from ranker.json")
            cfg = from_dict(Config, read_yaml(Path(entry.path) / "config.yaml"))
            self.rankers[name] = Ranker(self.peft, tok, rank_tok, entry.info, cfg)
        self.loaded = sorted(self.peft.peft_config)  # a new list: stats() reads it without the lock
        log.info("adapter %r ready (loaded: %s)", name, self.loaded)

    # -- ranking -------------------------------------------------------------------------------

    async def rank(self, payload: dict) -> dict:
        """payload: adapter, mode, history [[title, attributes, rating]], candidates [[title, attributes]].

        Returns {"order": prompt positions best first, "scores": per position, "batch_size"} or
        {"error", "status"} for a request that cannot be ranked (the rest of its batch still is).
        """
        name = payload.get("adapter")
        if name not in self.registry:
            return {"error": f"unknown adapter {_safe_text(name, 80)!r}", "status": 404}
        await self.get_adapter(name)
        return await self._batched(payload)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, payloads: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._run_batch, payloads)
        with self._stats_lock:
            self.busy_s += time.perf_counter() - t0
        return out

    def _run_batch(self, payloads: list[dict]) -> list[dict]:
        from alro_ray.data.prompts import Item

        n = len(payloads)
        with self._stats_lock:
            self.batch_sizes[n] += 1
            self.requests += n
        results: list[dict | None] = [None] * n
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, p in enumerate(payloads):
            try:
                ranker = self.rankers.get(p["adapter"])
                if ranker is None:  # evicted between load and batch: load it again
                    with self._lock:
                        self._attach(p["adapter"])
                    ranker = self.rankers[p["adapter"]]
                c = len(p["candidates"])
                if not 2 <= c <= ranker.candidates:
                    results[i] = {"error": f"adapter {p['adapter']!r} ranks 2 to {ranker.candidates} "
                                           f"candidates, got {c}", "status": 422}
                    continue
                history = [(Item(t, a), r) for t, a, r in p["history"]]
                ids = ranker.prompt_ids(history, [Item(t, a) for t, a in p["candidates"]])
            except Exception as e:  # a bug or a broken checkpoint: fail this request only
                log.exception("cannot prepare a request")
                results[i] = {"error": f"internal error preparing the request: {type(e).__name__}", "status": 500}
                continue
            if len(ids) > self.settings.max_prompt_tokens:
                results[i] = {"error": f"the rendered prompt has {len(ids)} tokens, limit "
                                       f"{self.settings.max_prompt_tokens}: shorten history or titles",
                              "status": 422}
                continue
            groups[(p["adapter"], p["mode"], c)].append((i, ids))
        for (name, mode, c), members in groups.items():
            members.sort(key=lambda m: len(m[1]))  # less padding
            try:
                with self._lock:
                    if name not in self.peft.peft_config:
                        self._attach(name)
                    self.peft.set_adapter(name)
                    orders, scores = self.rankers[name].rank([ids for _, ids in members], mode, c)
            except Exception as e:  # fail this group only; the rest of the batch is answered
                log.exception("ranking a group of %d failed", len(members))
                for i, _ in members:
                    results[i] = {"error": f"internal error while ranking: {type(e).__name__}", "status": 500}
                continue
            with self._stats_lock:
                self.group_sizes[len(members)] += 1
            for (i, _), order, score in zip(members, orders, scores):
                results[i] = {"order": order, "scores": score, "batch_size": n}
        return results

    def stats(self) -> dict:
        import torch

        with self._stats_lock:
            batch_sizes, group_sizes, requests = dict(self.batch_sizes), dict(self.group_sizes), self.requests
            busy_s = self.busy_s
        return {
            "requests": requests,
            "batches": sum(batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
            "forward_batch_sizes": {str(k): v for k, v in sorted(group_sizes.items())},
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
            "loaded_adapters": self.loaded,
            "adapter_loads": self.adapter_loads,
            "busy_s": round(busy_s, 3),
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def ping(self) -> str:
        return "ok"


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validation, limits and error bodies; forwards to the ranker by adapter name."""

    def __init__(self, ranker, settings: ServeSettings, registry: dict[str, AdapterEntry]):
        self.ranker = ranker
        self.settings = settings
        self.registry = registry

    def __serve_build_asgi_app__(self):
        return make_fastapi_app(self.settings, self.registry, self.ranker)


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
        from starlette.responses import JSONResponse

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


def _error(status: int, message: str, detail: list | None = None):
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"error": _safe_text(message, 2000)}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _loc(loc) -> list:
    """A field path without pydantic's union-branch tags ("function-after[...]", "constrained-int")."""
    return [_safe_text(x, 80) if isinstance(x, str) else x for x in loc
            if not (isinstance(x, str) and ("[" in x or x.startswith(("constrained-", "function-"))))]


def _validation_detail(errors) -> list[dict]:
    out = []
    for e in errors[:20]:
        out.append({"loc": _loc(e.get("loc", ())),
                    "msg": _safe_text(e.get("msg", ""), 300), "type": _safe_text(e.get("type", ""), 80)})
    return out


def make_fastapi_app(settings: ServeSettings, registry: dict[str, AdapterEntry], ranker):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    max_c = max(e.candidates for e in registry.values())
    schemas = make_schemas(settings, max_c)
    RankRequest, RankResponse, ErrorBody = schemas["RankRequest"], schemas["RankResponse"], schemas["ErrorBody"]
    errors = {code: {"model": ErrorBody, "description": text} for code, text in
              [(400, "invalid JSON"), (404, "unknown adapter"), (413, "request body too large"),
               (422, "request does not match the schema or the limits")]}

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
            return _error(404, f"unknown adapter {_safe_text(name, 80)!r}; available: {sorted(registry)}")
        if len(req.candidates) > entry.candidates:
            return _error(422, f"adapter {name!r} was trained with C={entry.candidates} identifiers: "
                               f"send 2 to {entry.candidates} candidates, got {len(req.candidates)}")
        mode = req.mode or settings.default_mode
        payload = {
            "adapter": name,
            "mode": mode,
            "history": [[h.title, h.attributes, h.rating] for h in req.history],
            "candidates": [[c.title, c.attributes] for c in req.candidates],
        }
        try:
            out = await ranker.options(multiplexed_model_id=name).rank.remote(payload)
        except Exception as e:  # the ranker replica failed or is gone; others keep serving
            log.exception("ranker call failed")
            return _error(503, f"ranker unavailable: {type(e).__name__}")
        if "error" in out:
            return _error(out.get("status", 500), out["error"])
        ids = [c.id for c in req.candidates]
        scores = {}
        for j, s in enumerate(out["scores"]):
            scores[str(ids[j])] = float(s) if math.isfinite(s) else None
        return {"ranking": [ids[j] for j in out["order"]], "scores": scores, "adapter": name,
                "mode": mode, "batch_size": out["batch_size"]}

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


# --------------------------------------------------------------------------------------------
# Application builder and the Python entry point
# --------------------------------------------------------------------------------------------


def build_app_from(settings: ServeSettings, registry: dict[str, AdapterEntry]):
    ranker_opts: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests or 4 * settings.max_batch_size}
    if settings.num_replicas is not None:
        ranker_opts["num_replicas"] = settings.num_replicas
    actor: dict[str, Any] = {}
    if settings.num_cpus is not None:
        actor["num_cpus"] = settings.num_cpus
    if settings.num_gpus is not None:
        actor["num_gpus"] = settings.num_gpus
    if actor:
        ranker_opts["ray_actor_options"] = actor
    ingress_opts: dict[str, Any] = {"max_ongoing_requests": settings.ingress_max_ongoing_requests or 256}
    if settings.ingress_num_cpus is not None:
        ingress_opts["ray_actor_options"] = {"num_cpus": settings.ingress_num_cpus}
    ranker = RankerDeployment.options(**ranker_opts).bind(settings, registry)
    return Ingress.options(**ingress_opts).bind(ranker, settings, registry)


def build_app(args: dict):
    """Serve application builder: `import_path: alro_ray.serve.app:build_app`, `args:` = ServeSettings."""
    settings = ServeSettings.from_dict(dict(args))
    registry = load_registry(settings.adapters, settings.base_dir)
    return build_app_from(settings, registry)


def run_serve(adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
              **limits) -> str:
    """Serve `adapters` (name -> checkpoint dir) at http://host:port; returns that URL.

    `limits` are ServeSettings fields (max_batch_size=, batch_wait_timeout_s=, max_history=, ...,
    num_replicas=, num_cpus=, num_gpus=). Raises ConfigError (an AlroError) before starting
    anything if a setting, a checkpoint or the shared base model is wrong. blocking=True serves
    until Ctrl-C, then shuts Serve down; blocking=False returns once the app is running (call
    `ray.serve.shutdown()` to stop it).
    """
    settings = ServeSettings.from_dict({"adapters": dict(adapters), **limits})
    registry = load_registry(settings.adapters, settings.base_dir)
    from alro_ray.cluster import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app_from(settings, registry), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    log.info("serving adapters %s at %s (docs: %s/docs)", sorted(registry), url, url)
    if not blocking:
        return url
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        serve.shutdown()
    return url
