"""A Tune callback that interrupts a study after n trials, leaving it resumable.

Its own module so that importing `tuning` (the CLI does) does not import Ray Tune, while Tune can
still unpickle the callback it saved with the experiment.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid

from ray.tune import Callback

log = logging.getLogger("alro_ray")

# Tokens of the callbacks this process created; a copy Tune restores from an old experiment is inert.
ACTIVE: set[str] = set()


class InterruptAfter(Callback):
    """Ends the study, the way Ctrl-C does, once `n` trials have ended.

    It sends the driver SIGUSR1, which Tune handles like SIGINT: the experiment state is saved with
    the running trials unfinished and the search not finished, so a rerun resumes.
    (`Stopper.stop_all` would mark the search finished: nothing left to resume.)
    """

    def __init__(self, n: int):
        self.n, self.ended, self.token = n, 0, uuid.uuid4().hex
        ACTIVE.add(self.token)

    def _ended(self) -> None:
        self.ended += 1
        if self.ended == self.n and self.token in ACTIVE:
            log.warning("%d trials ended: stopping the study here (rerun the same command to resume)", self.n)
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended()
