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
import time
from typing import Any

from ray import serve

from alro_ray.cluster import ensure_ray
from alro_ray.serve.deployments import Ingress, RankerDeployment
from alro_ray.serve.http import make_fastapi_app
from alro_ray.serve.registry import AdapterEntry, adapters_from_args, load_registry
from alro_ray.serve.settings import APP_NAME, ServeSettings

__all__ = ["Ingress", "RankerDeployment", "ServeSettings", "AdapterEntry", "adapters_from_args", "build_app",
           "build_app_from", "load_registry", "make_fastapi_app", "run_serve"]

log = logging.getLogger("alro_ray")


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
