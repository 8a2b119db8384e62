"""Sending a request again when the ranker replica that had it died.

What a dead replica gives the caller in Ray 2.60 (ray/serve/_private/router.py, replica_result.py):
awaiting the DeploymentResponse raises `ActorDiedError` (the process is gone) or
`ActorUnavailableError` (unreachable; both are `RayActorError`), sometimes wrapped in a
`RayTaskError`; the router raises `ReplicaUnavailableError`. The router has by then dropped the
replica, so a new call goes to another replica, or waits in the router's queue until Serve's
controller has started a new one. Ranking is a pure function of the request, so sending it
again is safe.

With the ranker's queue bounded (max_queued_requests), a retry can find it full: the dead
replica's other requests wait there for its successor. Such a request was accepted before the
replica died, so it waits for room (within the budget, not counted as an attempt); only a first
attempt that finds the queue full is refused (the caller answers 503: overload).
"""

import asyncio
import logging
import time
from typing import Awaitable, Callable

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

log = logging.getLogger("alro_ray")

FIRST_BACKOFF_S = 0.2  # doubled after each failure, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 2.0


class ReplicaLost(Exception):
    """Every attempt found its replica dead, or no replica answered within the budget."""

    def __init__(self, attempts: int, waited_s: float, last: BaseException | None):
        self.attempts, self.waited_s, self.last = attempts, waited_s, last
        cause = f"; last error {type(last).__name__}" if last is not None else ""
        super().__init__(f"the ranker replica died under this request and no replica answered in "
                         f"{attempts} attempt(s) over {waited_s:.1f} s{cause}")


def replica_died(exc: BaseException) -> bool:
    """Whether `exc` says the replica is gone (so another attempt can succeed), not that it failed."""
    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError)


async def call_with_retry(call: Callable[[], Awaitable], attempts: int, budget_s: float):
    """`await call()`; if its replica died, call again: at most `attempts` more times, all within
    `budget_s` seconds of the first failure, with exponential backoff between attempts.

    The first call has no time limit (under load a request may queue for long); a retry is
    cancelled when the budget is spent. Raises ReplicaLost then; any other error at once.
    """
    failed_at: float | None = None
    last: BaseException | None = None
    tries = 0
    while True:
        tries += 1
        try:
            if failed_at is None:
                return await call()
            left = budget_s - (time.monotonic() - failed_at)
            return await asyncio.wait_for(call(), timeout=left)
        # asyncio.wait_for's, on a retry: the budget is spent. Both names: one class from Python
        # 3.11 on, but on 3.10 asyncio.TimeoutError is not the builtin TimeoutError.
        except (TimeoutError, asyncio.TimeoutError):
            if failed_at is None:
                raise
            break
        except Exception as e:
            queue_full = failed_at is not None and isinstance(e, BackPressureError)
            if not (replica_died(e) or queue_full):
                raise
            last = e
            failed_at = failed_at if failed_at is not None else time.monotonic()
            if queue_full:  # room in the queue comes when the new replica answers: time, not an attempt
                tries -= 1
        delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (tries - 1))
        if tries > attempts or time.monotonic() - failed_at + delay >= budget_s:
            break
        log.warning("ranker replica died under a request (%s); attempt %d of %d in %.1f s",
                    type(last).__name__, tries + 1, attempts + 1, delay)
        await asyncio.sleep(delay)
    waited = time.monotonic() - failed_at if failed_at is not None else 0.0
    raise ReplicaLost(tries, waited, last)
