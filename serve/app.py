"""The ALRO ranker as a Ray Serve application: FastAPI ingress + multiplexed, batched ranker.

The implementation is `alro_ray.serve.app` (inside the installed package, so every Ray worker on
every node can import it); this module re-exports it for `serve run serve.app:build_app ...`
from the repository root. `serve/config.yaml` names `alro_ray.serve.app:build_app` directly.
"""

from alro_ray.serve.app import (  # noqa: F401
    Ingress,
    RankerDeployment,
    ServeSettings,
    adapters_from_args,
    build_app,
    build_app_from,
    load_registry,
    make_fastapi_app,
    run_serve,
)
