"""Connecting to Ray: a cluster when one is named (RAY_ADDRESS, as `ray job submit` sets it),
else a local one sized for this machine."""

from __future__ import annotations

import logging
import os

from alro_ray.logs import LOG_FILE_ENV, worker_to_file

log = logging.getLogger("alro_ray")


def quiet_ray_data(progress: bool) -> None:
    """Ray Data's progress lines are useful for a long prepare, noise inside training workers."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)


# Ray Train's placement-group cleaner (Ray >= 2.60) asks the state API every second whether the
# train controller lives, and warns each time it cannot: the local Ray below runs without the
# dashboard that serves that API, so the warning would fill the job's log once a second.
_NOISY_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Run in every worker process of the local Ray (`worker_process_setup_hook`): the libraries'
    output to the driver's log file, if it has one (logs.py)."""
    for name in _NOISY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    worker_to_file()


def ensure_ray(num_cpus: int | None = None, object_store_mb: int = 1024) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("connected to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    # A capped object store keeps small containers from running out of /dev/shm. address="local":
    # always a new local cluster, never one that another program left registered in /tmp/ray.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": quiet_worker_logs,
                     "env_vars": {k: os.environ[k] for k in (LOG_FILE_ENV,) if k in os.environ}},
    )
    log.info("started a local Ray: %s", ray.cluster_resources())
