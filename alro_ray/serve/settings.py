"""Serve settings: what `build_app` (YAML `args:`) and `run_serve` (keyword arguments) accept.

Read like every config section: a dataclass, typed by config/loading.py's checker, then its own
`validate` for ranges (HTTP requests are pydantic models, made from these limits: serve/schemas.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alro_ray.config import from_dict
from alro_ray.errors import ConfigError
from alro_ray.rank.modes import MODES

APP_NAME = "alro"
# Names clients use (a request's `adapter`, GET /adapters). PEFT never sees them: a dot, or a name
# like "eval" or "to" (a module attribute), cannot name a PEFT adapter, so each entry is loaded
# under an internal name (registry.AdapterEntry.peft_name).
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServeSettings:
    """Everything `build_app` / `run_serve` accept besides the HTTP host and port.

    Limits are checked by the ingress before any model work; a request over one gets a 4xx.
    """

    adapters: dict[str, str] = field(default_factory=dict)  # name -> checkpoint directory
    default_adapter: str | None = None  # None: "default" if registered, else the first name
    default_mode: Literal[MODES] = "generate"  # score: every adapter needs a score head
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
    # a request whose ranker replica died is sent again (ranking is a pure function: safe to
    # repeat) up to `retry_attempts` more times, within `retry_budget_s` of the first failure:
    # with one replica that is the time Serve's controller needs to start a new one
    retry_attempts: int = 4
    retry_budget_s: float = 60.0
    # overload and time limits: a request beyond max_ongoing_requests per ranker replica waits in a
    # queue of max_queued_requests (None: 4 x max_batch_size, about four batches); past it the
    # answer is 503 with Retry-After at once. A request not answered in request_timeout_s gets 504.
    max_queued_requests: int | None = None
    retry_after_s: int = 1  # the Retry-After of a 503
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0  # on shutdown (SIGTERM, Ctrl-C): how long requests in flight may finish
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
        """The one config path (config/loading.py): types by the typed checker, then `validate`."""
        data = dict(data)
        if isinstance(data.get("adapters"), dict):  # checkpoint paths may come as Path objects
            data["adapters"] = {k: str(v) if isinstance(v, Path) else v for k, v in data["adapters"].items()}
        return from_dict(cls, data, prefix="serve.").validate()

    def validate(self) -> "ServeSettings":
        """What types cannot say: names, ranges and cross-field rules."""
        if not self.adapters:
            raise ConfigError("serve: `adapters` must map at least one adapter name to a checkpoint directory")
        for name, path in self.adapters.items():
            if not ADAPTER_NAME.match(name):
                raise ConfigError(f"serve: adapter name {name!r} must match {ADAPTER_NAME.pattern}")
            if not path:
                raise ConfigError(f"serve: adapter {name!r} needs a checkpoint directory, got {path!r}")
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ConfigError(f"serve.default_adapter {self.default_adapter!r} is not in adapters "
                              f"{sorted(self.adapters)}")
        for name in ("max_history", "max_title_chars", "max_attribute_chars", "max_id_chars", "max_body_bytes",
                     "max_prompt_tokens", "max_batch_size", "max_adapters_per_replica", "num_replicas",
                     "max_ongoing_requests", "max_queued_requests", "ingress_max_ongoing_requests", "torch_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"serve.{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.retry_attempts <= 20:
            raise ConfigError(f"serve.retry_attempts must be an integer in [0, 20], got {self.retry_attempts!r}")
        for name in ("retry_budget_s", "request_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:  # NaN fails too
                raise ConfigError(f"serve.{name} must be in (0, 3600] seconds, got {value!r}")
        if not 0 <= self.retry_after_s <= 3600:
            raise ConfigError(f"serve.retry_after_s must be an integer in [0, 3600] seconds, "
                              f"got {self.retry_after_s!r}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise ConfigError(f"serve.batch_wait_timeout_s must be in [0, 10] seconds, "
                              f"got {self.batch_wait_timeout_s!r}")
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN too
                raise ConfigError(f"serve.{name} must be >= 0, got {value!r}")
        return self

    @property
    def default_name(self) -> str:
        if self.default_adapter:
            return self.default_adapter
        return "default" if "default" in self.adapters else next(iter(self.adapters))

    @property
    def ongoing_limit(self) -> int:
        """Requests one ranker replica works on at once: enough for its batches to fill."""
        return self.max_ongoing_requests or 4 * self.max_batch_size

    @property
    def queue_limit(self) -> int:
        """Requests each caller queues for the ranker beyond the replicas' ongoing ones."""
        return self.max_queued_requests or 4 * self.max_batch_size
