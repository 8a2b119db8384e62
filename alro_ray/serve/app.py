"""Serving trained rankers over HTTP with Ray Serve: the application builders (see docs/serving.md).

Two deployments (`alro_ray.serve.deployments`):

  ingress  FastAPI app (`alro_ray.serve.http`): request schema (`schemas`), limits, errors as JSON,
           routing by adapter name, a retry when the ranker replica died (`retry`). No model here.
  ranker   one base model per replica with several LoRA adapters on it, loaded on demand by name
           through Serve model multiplexing (`@serve.multiplexed`, LRU per replica), and dynamic
           request batching (`@serve.batch`): a batch is split into groups of the same adapter,
           mode and candidate count, each ranked in one forward pass. An adapter with NaN/inf
           weights or scores is answered with a 500, never with an order.

Adapters come from a registry fixed at start (`registry`: name -> checkpoint directory). A
request names an adapter, never a path; every adapter of one registry must share the base model
(checked at start, before anything is deployed). Settings: `settings.ServeSettings`.

The code lives in the installed package (not in `serve/`) so that every Ray worker, on any node,
can import it: `serve/config.yaml` points at `alro_ray.serve.app:build_app`.

Entry points:
  build_app(args)                Serve application builder (`serve run serve/config.yaml`)
  run_serve(adapters, ...)       start a local (or RAY_ADDRESS) Ray and Serve; what `alro serve` calls
  adapters_from_args(...)        `--checkpoint DIR` / `--adapter name=DIR` -> registry dict
"""

import logging
from typing import Any

from ray import serve

from alro_ray.cluster import ensure_ray
from alro_ray.serve.auth import ApiKey
from alro_ray.serve.deployments import Ingress, RankerDeployment
from alro_ray.serve.http import make_fastapi_app
from alro_ray.serve.lifecycle import Placement, StopSignals, check_placement, stop_app
from alro_ray.serve.registry import AdapterEntry, adapters_from_args, load_registry
from alro_ray.serve.settings import APP_NAME, ServeSettings

__all__ = ["Ingress", "RankerDeployment", "ServeSettings", "AdapterEntry", "adapters_from_args", "build_app",
           "build_app_from", "load_registry", "make_fastapi_app", "run_serve"]

log = logging.getLogger("alro_ray")


def build_app_from(settings: ServeSettings, registry: dict[str, AdapterEntry]):
    """The application graph. The ranker's queue is bounded (past it: 503 with Retry-After), and
    on shutdown every replica finishes its requests in flight for up to drain_timeout_s. The API key
    is read here, where the app is built (ALRO_SERVE_API_KEY); the ingress gets only its digest."""
    drain = {"graceful_shutdown_timeout_s": settings.drain_timeout_s, "graceful_shutdown_wait_loop_s": 0.5}
    ranker_opts: dict[str, Any] = {"max_ongoing_requests": settings.ongoing_limit,
                                   "max_queued_requests": settings.queue_limit, **drain}
    if settings.num_replicas is not None:
        ranker_opts["num_replicas"] = settings.num_replicas
    actor: dict[str, Any] = {}
    if settings.num_cpus is not None:
        actor["num_cpus"] = settings.num_cpus
    if settings.num_gpus is not None:
        actor["num_gpus"] = settings.num_gpus
    if actor:
        ranker_opts["ray_actor_options"] = actor
    ingress_opts: dict[str, Any] = {"max_ongoing_requests": settings.ingress_max_ongoing_requests or 256, **drain}
    if settings.ingress_num_cpus is not None:
        ingress_opts["ray_actor_options"] = {"num_cpus": settings.ingress_num_cpus}
    ranker = RankerDeployment.options(**ranker_opts).bind(settings, registry)
    return Ingress.options(**ingress_opts).bind(ranker, settings, registry, ApiKey.from_env().digest)


def build_app(args: dict):
    """Serve application builder: `import_path: alro_ray.serve.app:build_app`, `args:` = ServeSettings."""
    settings = ServeSettings.from_dict(dict(args))
    registry = load_registry(settings.adapters, settings.base_dir)
    return build_app_from(settings, registry)


def run_serve(adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
              app_name: str = APP_NAME, route_prefix: str = "/", **limits) -> str:
    """Serve `adapters` (name -> checkpoint dir) as app `app_name` at http://host:port/route_prefix;
    returns that URL.

    `limits` are ServeSettings fields (max_batch_size=, batch_wait_timeout_s=, max_history=, ...,
    num_replicas=, num_cpus=, num_gpus=). Raises ConfigError (an AlroError) before deploying
    anything if a setting, a checkpoint or the shared base model is wrong, or if the app would
    clash with one that runs on the cluster (its name or route taken, Serve on another port).
    blocking=True serves until Ctrl-C or SIGTERM, then removes this app only, after its requests
    in flight (up to drain_timeout_s); blocking=False returns once the app is running (stop it with
    `ray.serve.delete(app_name)`).
    """
    settings = ServeSettings.from_dict({"adapters": dict(adapters), **limits})
    registry = load_registry(settings.adapters, settings.base_dir)
    where = Placement(app_name, route_prefix, host, int(port))
    ensure_ray()
    serve_was_running = check_placement(where)
    signals = StopSignals() if blocking else None  # a signal while deploying stops once it is up
    if not serve_was_running:  # the proxy's own limit: a backstop behind the ingress's request_timeout_s
        serve.start(http_options={"host": host, "port": int(port),
                                  "request_timeout_s": settings.request_timeout_s + 30})
    serve.run(build_app_from(settings, registry), name=app_name, route_prefix=route_prefix, blocking=False)
    log.info("serving adapters %s as app %r at %s (docs: %s/docs)", sorted(registry), app_name, where.url, where.url)
    if signals:
        signals.wait()
        stop_app(app_name, serve_was_running)
    return where.url
