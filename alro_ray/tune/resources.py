"""What a Tune trial's Train run holds, and making sure it gives it back.

Ray Train V2 under Tune: the trial actor runs `TorchTrainer.fit`, which starts a Train controller
actor (owned by the trial actor), which creates the placement group for the Train workers. When
ASHA stops a trial, Tune terminates the trial actor; the controller dies with its owner and the
workers with the controller, but the placement group outlives them: a placement group created by
a non-detached actor lives as long as the job (the Tune driver). Ray 2.60's own remedy, a detached
`PlacementGroupCleaner` per run, asks the State API whether the controller is alive; on a machine
where more than one Ray instance runs, it cannot tell which one to ask (`ConnectionError: Found
multiple active Ray instances`), its monitor thread dies, and the placement group stays: the
next trials wait for CPUs that nobody uses, forever. So the study releases them itself:

- `TrainResourceGuard` (a Ray Train controller callback, in each trial's Train run) writes the id
  of every placement group the run creates to OUTPUT/trials/<id>/placement_groups, and turns a
  worker group that cannot get its resources within `tune.resource_timeout_s` into a trial
  failure that names what it asked for and what the cluster has.
- `ReleaseTrainResources` (a Tune callback, in the driver) removes the recorded placement groups
  of every trial that has ended (completed, stopped by ASHA, failed), and `release_all` those of
  every trial once the session's `Tuner.fit` returns (an interrupted session kills its trials).

Its own module, imported only when a study runs: it imports Ray Tune and Ray Train internals.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.controller.state import ReschedulingState
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from alro_ray.config import Config
from alro_ray.errors import AlroError

log = logging.getLogger("alro_ray")

PG_RECORD = "placement_groups"  # in OUTPUT/trials/<trial_id>/: one placement group id (hex) a line
# Ray Train's wait for a worker group's placement group (default 60 s, then it retries forever).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ResourceTimeoutError(AlroError):
    """A trial's Train workers did not get their resources within tune.resource_timeout_s."""


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's Train workers ask for together (the trial actor itself asks for no CPU)."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = t.num_workers * t.gpus_per_worker
    return {k: v for k, v in need.items() if v > 0}


def _fmt_resources(res: dict) -> str:
    shown = {k: v for k, v in res.items() if k in ("CPU", "GPU") or k.startswith("accelerator")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def concurrent_trials(cfg: Config) -> int:
    """How many trials run at once: `tune.max_concurrent`, lowered on a local Ray to what fits.

    Each trial's Train workers reserve their resources only once the trial has started, so trials
    beyond what the cluster holds would start and then wait inside Ray Train; on a local Ray
    (fixed size) that wait is pointless and would only count against `tune.resource_timeout_s`.
    On a cluster (RAY_ADDRESS) the autoscaler may add nodes, so the setting is kept."""
    need, have = trial_resources(cfg), ray.cluster_resources()
    fits = min((int(have.get(k, 0) // v) for k, v in need.items()), default=cfg.tune.max_concurrent)
    local = not os.environ.get("RAY_ADDRESS")
    per_worker = f"train.num_workers={cfg.train.num_workers} x per-worker resources"
    if fits < 1:
        message = f"one trial needs {_fmt_resources(need)} ({per_worker}), the cluster has {_fmt_resources(have)}"
        if local:
            raise AlroError(message + ": lower train.num_workers or train.cpus_per_worker")
        log.warning("%s: the trials wait until the autoscaler adds nodes (up to tune.resource_timeout_s=%gs)",
                    message, cfg.tune.resource_timeout_s)
        return cfg.tune.max_concurrent
    if fits < cfg.tune.max_concurrent:
        if local:
            log.warning("tune.max_concurrent=%d, but this Ray has %s and each trial needs %s: running %d "
                        "trial(s) at a time", cfg.tune.max_concurrent, _fmt_resources(have),
                        _fmt_resources(need), fits)
            return fits
        log.warning("%d concurrent trials need %s each, the cluster has %s: trials wait for each other "
                    "or the autoscaler (up to tune.resource_timeout_s=%gs each)", cfg.tune.max_concurrent,
                    _fmt_resources(need), _fmt_resources(have), cfg.tune.resource_timeout_s)
    return cfg.tune.max_concurrent


def _holders() -> str:
    """The placement groups that hold resources now (Tune's trial actors and Train worker groups)."""
    held = [info for info in placement_group_table().values() if info.get("state") == "CREATED"]
    parts = []
    for info in held:
        total: dict[str, float] = {}
        for bundle in info.get("bundles", {}).values():
            for k, v in bundle.items():
                total[k] = total.get(k, 0) + v
        if any(k in ("CPU", "GPU") for k in total):
            parts.append(f"{info['placement_group_id'][:12]} ({_fmt_resources(total)})")
    return ", ".join(parts) or "none"


def timeout_message(need: dict, timeout_s: float) -> str:
    return (f"the trial's Train workers waited {timeout_s:g} s for {_fmt_resources(need)} and did not get "
            f"them; the cluster has {_fmt_resources(ray.cluster_resources())}, free now "
            f"{_fmt_resources(ray.available_resources())}; placement groups holding CPU/GPU: {_holders()}. "
            "Lower tune.max_concurrent or train.num_workers, add nodes, or raise tune.resource_timeout_s")


class TrainResourceGuard(ControllerCallback, WorkerGroupCallback):
    """Runs in the trial's Train controller (an internal Ray Train callback: the public
    `UserCallback` sees neither the worker group nor the controller's state).

    The trial sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S to the timeout, so one wait for the
    placement group lasts that long; Ray Train would then retry forever, this fails the run."""

    def __init__(self, trial_dir: str | Path, need: dict, timeout_s: float):
        self.record, self.need, self.timeout_s = Path(trial_dir) / PG_RECORD, need, timeout_s

    def after_worker_group_start(self, worker_group) -> None:
        try:
            state = worker_group.get_worker_group_state()
            handle = getattr(state, "placement_group_handle", None)  # Ray >= 2.5x; older: .placement_group
            pg = handle.placement_group if handle is not None else state.placement_group
            with open(self.record, "a") as f:
                f.write(pg.id.hex() + "\n")
        except Exception as e:  # noqa: BLE001 - never fail a Train run over the record
            log.warning("could not record the Train placement group in %s (%s): a stopped trial may hold "
                        "its resources until the study ends", self.record, e)

    def after_controller_state_update(self, previous_state, current_state) -> None:
        error = getattr(current_state, "training_failed_error", None)
        if isinstance(current_state, ReschedulingState) and isinstance(
                getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
            raise ResourceTimeoutError(timeout_message(self.need, self.timeout_s))


def release_trial(trial_dir: Path, table: dict | None = None) -> list[str]:
    """Remove the trial's recorded placement groups that still exist; returns their ids."""
    record = trial_dir / PG_RECORD
    if not record.is_file():
        return []
    table = placement_group_table() if table is None else table
    released = []
    for pg_id in dict.fromkeys(record.read_text().split()):
        if table.get(pg_id, {}).get("state", "REMOVED") == "REMOVED":
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            released.append(pg_id)
        except Exception as e:  # noqa: BLE001 - already gone, or the cluster is going away
            log.debug("removing placement group %s: %s", pg_id, e)
    return released


def release_all(out: Path) -> None:
    """After a session: every trial of the study has ended or been killed, so whatever placement
    group they recorded and still exists is a leftover."""
    table = placement_group_table()
    for trial_dir in sorted((out / "trials").glob("*")):
        released = release_trial(trial_dir, table)
        if released:
            log.info("trial %s: released %d leftover Train placement group(s)", trial_dir.name, len(released))


class ReleaseTrainResources(Callback):
    """Tune callback (driver): a few seconds after a trial has ended, remove its Train placement
    groups, and again every few seconds until the session ends.

    Not at once: the trial actor (and with it the controller) takes a moment to die, and a
    controller that lost its workers while alive would start a new group (train.max_failures)."""

    def __init__(self, out: str | Path, grace_s: float = 5.0):
        self.out, self.grace_s = Path(out), grace_s
        self.ended: dict[str, float] = {}  # trial id -> when it ended (monotonic)
        self.last = 0.0

    def __getstate__(self):  # Tune pickles its callbacks with the experiment: no session state
        return {"out": self.out, "grace_s": self.grace_s}

    def __setstate__(self, state):
        self.__init__(state["out"], state["grace_s"])

    def _ended(self, trial) -> None:
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        due = [t for t, at in self.ended.items() if now - at >= self.grace_s]
        if not due or now - self.last < self.grace_s:
            return
        self.last = now
        table = placement_group_table()
        for trial_id in due:
            released = release_trial(self.out / "trials" / trial_id, table)
            if released:
                log.info("trial %s ended: released its Train placement group(s) %s", trial_id,
                         ", ".join(p[:12] for p in released))
