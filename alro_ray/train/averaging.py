"""An exponential moving average of the trained weights (`train.ema_decay`).

A score head fitted on a few hundred lists moves its valid NDCG by up to 0.02 from one epoch to
the next, so the epoch `train.keep: best` picks, and the ranker it keeps, owe much to noise
(docs/method.md). With a decay d > 0 every applied optimizer step t updates

    shadow_t = d * shadow_{t-1} + (1 - d) * w_t,    shadow_0 = 0
    average_t = shadow_t / (1 - d^t)                (average_0 = w_0: no step yet)

(Adam's bias correction: the average of the steps' weights alone, not pulled toward the
initialisation), and validation and every checkpoint's ranker use average_t; the optimizer keeps
stepping the trained weights, which stay in DeepSpeed's state for a resume, with the shadow beside
them (`AVERAGE_FILE`). d = 0 leaves everything as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

AVERAGE_FILE = "average.pt"  # in a Ray Train checkpoint, beside state.json (rank 0 writes it)


class WeightAverage:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.steps = 0
        # float32 whatever the weights' dtype (bf16 would lose the small (1 - d) increments)
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if decay else []

    @property
    def active(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step."""
        if not self.active:
            return
        self.steps += 1
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> list[torch.Tensor]:
        """average_t of each parameter (float32); the weights themselves before the first step."""
        if not self.steps:
            return [p.detach().float().clone() for p in self.params]
        correction = 1.0 - self.decay ** self.steps
        return [s / correction for s in self.shadow]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model within the block, the trained ones back after it
        (exactly: they are copied aside, not recomputed)."""
        if not self.active:
            yield
            return
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.averaged()):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained):
                    p.copy_(w)

    def save(self, path: Path) -> None:
        torch.save({"decay": self.decay, "steps": self.steps, "shadow": [s.cpu() for s in self.shadow]}, path)

    def load(self, path: Path) -> bool:
        """The shadow of a checkpoint written with the same decay (a resume); False (and the
        average starts afresh) if it has none or another decay."""
        if not self.active or not path.is_file():
            return False
        saved = torch.load(path, weights_only=True)
        if saved["decay"] != self.decay or len(saved["shadow"]) != len(self.shadow):
            return False
        self.steps = int(saved["steps"])
        for s, v in zip(self.shadow, saved["shadow"]):
            s.copy_(v)
        return True
