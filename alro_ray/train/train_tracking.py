"""A training run in MLflow (alro_ray/tracking.py): the run, and the Ray Train callback that logs
each epoch into it.

The driver starts (or, for a resumed output directory, reopens) the run before any worker starts
and logs the config; `EpochLogger` logs every epoch's report as it arrives. Ray calls it in the
Train controller, which Ray places on the driver's node, once per `ray.train.report`: workers
never talk to MLflow, and a restarted worker group does not log an epoch twice. At the end the
driver logs final/ and history.json and closes the run.
"""

from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback

from alro_ray import tracking
from alro_ray.config import Config


class EpochLogger(UserCallback):
    """Rank 0's epoch metrics (all ranks report the same gathered values), step = epoch."""

    def __init__(self, run: tracking.Run):
        self.run = run

    def after_report(self, run_context, metrics, checkpoint) -> None:
        report = metrics[0]
        self.run.log_metrics({k: v for k, v in tracking.scalars(report).items() if k != "epoch"},
                             step=int(report["epoch"]))


class TrainTracking:
    """The training run's MLflow run, or nothing at all when tracking is off."""

    def __init__(self, run: tracking.Run | None):
        self.run = run

    @classmethod
    def start(cls, cfg: Config, out: Path, parent: str | None = None) -> "TrainTracking":
        return cls(tracking.start_run(cfg.tracking, out.name, run_dir=out, parent=parent,
                                      params=tracking.config_params(cfg),
                                      tags={"alro.command": "train", "alro.output_dir": str(out)}))

    def callbacks(self) -> list:
        return [EpochLogger(self.run)] if self.run else []

    def finished(self, out: Path) -> None:
        if self.run:
            self.run.log_artifacts(out / "final", "final")
            self.run.log_artifacts(out / "history.json")
            self.run.end()

    def failed(self) -> None:
        if self.run:
            self.run.end("FAILED")
