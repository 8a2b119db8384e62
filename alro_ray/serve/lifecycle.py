"""One app among others on a Serve instance: refused when it would clash with what runs, and
stopped, on Ctrl-C or SIGTERM, by removing only what it deployed after its requests in flight.

Serve's HTTP host and port belong to the Serve instance (one per Ray cluster) and cannot change
while it runs; each application has a name and a route prefix of its own.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass

from ray import serve

from alro_ray.errors import ConfigError

log = logging.getLogger("alro_ray")

ROUTE_PREFIX = re.compile(r"/|(/[A-Za-z0-9._~-]+)+")


@dataclass(frozen=True)
class Placement:
    """Where an app is served: its name and route on the Serve instance at host:port."""

    app_name: str
    route_prefix: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{'' if self.route_prefix == '/' else self.route_prefix}"


def _running_serve():
    """The running Serve instance's client, or None."""
    # No public call gives a running instance's HTTP options and routes (serve.status has neither).
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def check_placement(where: Placement) -> bool:
    """Refuse, naming the fix, an app that would replace or shadow one that runs, or a port that
    Serve cannot take; True when Serve already runs (this app then joins it)."""
    if not ROUTE_PREFIX.fullmatch(where.route_prefix):
        raise ConfigError(f"serve: route prefix {where.route_prefix!r} must look like /name or /a/b (or be /)")
    client = _running_serve()
    if client is None:
        return False
    http = client.http_config
    if (http.host, http.port) != (where.host, where.port):
        raise ConfigError(f"Serve already runs on this Ray cluster at http://{http.host}:{http.port}; its HTTP host "
                          f"and port cannot change while it runs: serve beside it with --host {http.host} "
                          f"--port {http.port} (and --app-name NAME --route-prefix /NAME), or stop it first")
    apps = client.get_serve_details().get("applications", {})
    for name, app in apps.items():
        if name == where.app_name or app.get("route_prefix") == where.route_prefix:
            raise ConfigError(f"a Serve application {name!r} already runs on this Ray cluster at route "
                              f"{app.get('route_prefix')!r} (http://{http.host}:{http.port}): serve this one "
                              f"beside it with another --app-name and --route-prefix (e.g. --app-name alro2 "
                              f"--route-prefix /alro2), or stop that one first")
    return True


class StopSignals:
    """Ctrl-C and SIGTERM, from before the app is deployed until it is removed: the first one asks
    to stop (`wait` returns); then a second Ctrl-C stops at once, a second SIGTERM is ignored (the
    drain is bounded anyway). Installed after ray.init, whose own SIGTERM handler ends the process
    at once (status 1, or SIGABRT from Ray's core worker)."""

    def __init__(self):
        self.stop = threading.Event()
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        log.info("%s: taking no new requests; finishing those in flight", signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stop.set()

    def wait(self) -> None:
        while not self.stop.wait(1.0):  # a timeout: signals are handled between waits
            pass


def stop_app(app_name: str, serve_was_running: bool) -> None:
    """Delete only `app_name` (Serve lets each replica finish its requests, up to the deployment's
    graceful_shutdown_timeout_s); Serve itself too when this process started it and no other app
    was deployed since."""
    serve.delete(app_name)
    if not serve_was_running and not serve.status().applications:
        serve.shutdown()
    log.info("stopped %r", app_name)
