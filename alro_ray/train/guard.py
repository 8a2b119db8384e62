"""The non-finite guard of the training loop: no update, checkpoint or final ranker from NaN/inf.

Two places can go non-finite, and every worker must take the same decision at each, or the
workers' collectives (ZeRO's gradient reduction, the optimizer step) fall out of step:
  - the loss, checked before backward: if any worker's loss is non-finite, every worker drops
    that micro-batch (no backward, no `engine.step()`), so DeepSpeed's micro-step counter and
    gradient buckets stay in lockstep and the accumulation window simply waits for the next one;
  - the gradient, checked at the accumulation boundary: DeepSpeed's ZeRO-1/2 and bf16 optimizers
    compute the global gradient norm (all-reduced) and skip a non-finite update on every rank:
    grads cleared, optimizer state untouched, LR schedule not advanced; `was_step_applied()`
    then says False. (Plain fp32 without ZeRO has no such check; the loop clears the grads itself.)
Each skip is counted (per epoch in the history, per run against `train.max_nonfinite_steps`) with
the users of the batch; one skip too many raises `NonFiniteError` on every worker, and the
driver reads the message from a file in the output directory (`FAILURE_FILE`), which also stops
Ray Train's restarts from running the doomed epoch again.
"""

from __future__ import annotations

import math
from pathlib import Path

from alro_ray.errors import NonFiniteError
from alro_ray.files import write_text

FAILURE_FILE = "nonfinite_error.txt"
HINT = ("try a lower train.lr, train.precision=fp32, or check the data of these users "
        "(ratings and prompts).")


def any_rank(flag: bool) -> bool:
    """True on every worker if `flag` is True on any (a MAX all-reduce; the flag itself outside
    torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_users(users: list[str]) -> list[str]:
    """Every worker's users, in rank order without repeats (called only when all workers skip)."""
    import torch.distributed as dist

    parts = [users]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, users)
    return list(dict.fromkeys(u for part in parts for u in part))


def grads_finite(params) -> bool:
    return all(p.grad is None or bool(p.grad.isfinite().all()) for p in params)


class NonFiniteGuard:
    """Counts skipped updates and stops the run after `limit` of them."""

    def __init__(self, limit: int, skipped_before: int = 0):
        self.limit = limit
        self.total = skipped_before  # in this run, resumed epochs included
        self.epoch_count = 0
        self.last: str = ""

    def start_epoch(self) -> None:
        self.epoch_count = 0

    def skipped(self, what: str, epoch: int, step: str, users: list[str]) -> None:
        """Record a skip seen by every worker (`what`: 'loss' or 'gradient norm'); raise on one too many."""
        self.total += 1
        self.epoch_count += 1
        shown = ", ".join(users[:8]) + (f" and {len(users) - 8} more" if len(users) > 8 else "")
        self.last = f"non-finite {what} at epoch {epoch}, step {step} (users {shown})"
        if self.total > self.limit:
            raise NonFiniteError(
                f"training stopped: {self.last}; that is {self.total} non-finite steps in this run, more "
                f"than train.max_nonfinite_steps={self.limit}. Each was skipped, so the model is not NaN, "
                f"but training is diverging: {HINT}")


def loss_is_finite(loss) -> bool:
    return math.isfinite(float(loss.detach()))


def check_weights(model, epoch: int) -> None:
    """Refuse to save non-finite trainable weights (checked on every worker, agreed by all)."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(p.detach().isfinite().all())]
    if any_rank(bool(bad)):
        raise NonFiniteError(
            f"non-finite weights after epoch {epoch} ({', '.join(bad[:3]) or 'on another worker'}); no "
            f"checkpoint was saved from them; {HINT}")


def write_failure(output_dir: str | Path, message: str) -> None:
    write_text(Path(output_dir, FAILURE_FILE), message + "\n")


def read_failure(output_dir: str | Path) -> str | None:
    path = Path(output_dir, FAILURE_FILE)
    return path.read_text().strip() if path.is_file() else None
