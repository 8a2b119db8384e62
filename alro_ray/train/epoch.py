"""One training epoch inside a Ray Train worker (worker.py runs them): a pass over this worker's
share of the rows, or over the frozen LM's cached states (train/frozen.py), with the ALRO loss
(objective.py), non-finite updates skipped on every worker alike (guard.py), and the weight
average (averaging.py) taking in every applied step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray.train
import torch

from alro_ray.config import Config
from alro_ray.data.tokenize import RankTokenizer
from alro_ray.model.score_head import head_of, scorer_of
from alro_ray.train import frozen, guard
from alro_ray.train.averaging import WeightAverage
from alro_ray.train.batching import MicroBatchCollate
from alro_ray.train.lower_states import LowerStates
from alro_ray.train.objective import compute_losses, step_loss
from alro_ray.train.shares import share_name

TERMS = ("loss", "sft", "rank", "perm")  # the loss terms each epoch reports (train_<term>)


@dataclass
class EpochRun:
    """What every epoch of one worker's run shares."""

    engine: object  # the DeepSpeed engine around the PEFT model
    params: list  # the trained parameters
    cfg: Config
    rank: int
    world: int
    micro_steps: int  # micro-batches per epoch on every worker
    rank_tok: RankTokenizer
    identifier_ids: torch.Tensor
    pad_id: int
    checks: guard.NonFiniteGuard
    own_grad_check: bool  # check gradients for NaN/inf here (DeepSpeed does under ZeRO and bf16)
    cached: dict | None  # the frozen LM's states per split (frozen.py), or None
    lower: LowerStates | None  # the frozen layers' states below LoRA (lower_states.py), or None
    average: WeightAverage
    say: Callable[[str], None]


def _batches(run: EpochRun, epoch: int):
    t = run.cfg.train
    if run.cached is not None:
        # a shuffle of its own per worker and epoch
        return run.cached["train"].micro_batches(t.micro_batch, seed=t.seed + 1000 * epoch + run.rank,
                                                 steps=run.micro_steps,
                                                 perm_index=epoch if run.cfg.loss.beta > 0 else None)
    # Each block of micro_batch * bucket rows is cut into length-bucketed micro-batches and collated
    # to tensors by Ray Data's prefetch thread (train/batching.py) while the previous step runs.
    collate_fn = MicroBatchCollate(t.micro_batch, t.bucket, seed=t.seed + epoch,
                                   perm_index=epoch if run.cfg.loss.beta > 0 else None)
    blocks = ray.train.get_dataset_shard(share_name(run.rank)).iter_torch_batches(
        batch_size=t.micro_batch * t.bucket, collate_fn=collate_fn, prefetch_batches=2,
        local_shuffle_buffer_size=256, local_shuffle_seed=t.seed + epoch)
    return (b for block in blocks for b in block)


def train_epoch(run: EpochRun, epoch: int) -> dict:
    """One pass over this worker's share; returns the epoch's metrics (train_<term> means, samples,
    tokens/s, non-finite steps). `steady_tokens_per_s` leaves out the first optimizer step (graph
    warm-up, the first blocks' read): the rate a longer run settles at."""
    t, engine, checks = run.cfg.train, run.engine, run.checks
    engine.train()
    checks.start_epoch()
    sums = dict.fromkeys(TERMS, 0.0)
    n, samples, tokens, t0, window = 0, 0, 0, time.time(), []
    last_line = t0  # when the last progress line was written
    steady_from = None  # (time, tokens) when the first optimizer step ended
    lower_read = run.lower.read if run.lower is not None else 0
    for step, batch in enumerate(_batches(run, epoch)):
        if step >= run.micro_steps:
            break
        loss_cfg = step_loss(run.cfg.loss, t.seed + run.rank, epoch, step)
        users = batch.users
        if run.cached is not None:
            terms = frozen.losses(head_of(engine), batch, loss_cfg)
        else:
            if loss_cfg.beta == 0:
                batch = batch.without_permutation()
            terms = compute_losses(engine, batch, run.identifier_ids, loss_cfg, run.pad_id,
                                   len(run.rank_tok.header_ids), shared_prefix=t.shared_prefix,
                                   scorer=scorer_of(engine, run.rank_tok), lower=run.lower)
        where = (epoch + 1, f"{step // t.grad_accum + 1} (micro-batch {step % t.grad_accum + 1}/{t.grad_accum})")
        finite = guard.loss_is_finite(terms.total)
        if guard.any_rank(not finite):  # every worker drops this micro-batch: no backward, no step
            checks.skipped("loss", *where, guard.gather_users([] if finite else users))
            if run.rank == 0:
                run.say(f"skipped: {checks.last}")
            continue
        window += users
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(terms.total)
        bad_grad = boundary and run.own_grad_check and guard.any_rank(not guard.grads_finite(run.params))
        if bad_grad:  # AdamW leaves parameters without a gradient alone
            for p in run.params:
                p.grad = None
        engine.step()
        if boundary:
            if bad_grad or not engine.was_step_applied():
                checks.skipped("gradient norm", *where, guard.gather_users(window))
                if run.rank == 0:
                    run.say(f"skipped: {checks.last}")
            else:
                run.average.update()
            window = []
        for key, value in zip(TERMS, (terms.total, terms.sft, terms.rank, terms.perm)):
            sums[key] += float(value.detach())
        n += 1
        samples += batch.size
        tokens += batch.tokens
        if boundary and steady_from is None:
            steady_from = (time.time(), tokens)
        if run.rank == 0 and boundary and progress_due((step + 1) // t.grad_accum, t.log_every,
                                                       time.time() - last_line, t.log_seconds):
            last_line = time.time()
            skipped = f", {checks.epoch_count} non-finite skipped (last: {checks.last})" if checks.epoch_count else ""
            done, total = (step + 1) // t.grad_accum, run.micro_steps // t.grad_accum
            run.say(f"epoch {epoch + 1}/{t.epochs} {progress_bar(done, total)} step {done}/{total} "
                    f"loss {sums['loss'] / max(n, 1):.4f} (sft {sums['sft'] / max(n, 1):.4f} "
                    f"rank {sums['rank'] / max(n, 1):.4f} perm {sums['perm'] / max(n, 1):.4f}) "
                    f"{tokens * run.world / (time.time() - t0):.0f} tok/s{skipped}")
    end = time.time()
    seconds = end - t0
    metrics = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
    # samples: this worker's times the world size (every worker runs the same number of micro-steps)
    metrics.update(epoch=epoch + 1, train_seconds=seconds, train_samples=samples * run.world,
                   tokens_per_s=tokens * run.world / max(seconds, 1e-9), nonfinite_steps=checks.epoch_count)
    if run.lower is not None:  # the sequences whose layers below LoRA ran in this epoch (0: all read back)
        metrics["lower_states_read"] = _sum_over_workers(run.lower.read - lower_read)
    if steady_from is not None and tokens > steady_from[1]:
        metrics["steady_tokens_per_s"] = (tokens - steady_from[1]) * run.world / max(end - steady_from[0], 1e-9)
    return metrics


def _sum_over_workers(n: int) -> int:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def progress_due(steps_done: int, log_every: int, since_last: float, log_seconds: float) -> bool:
    """Whether a progress line is due at the end of optimizer step `steps_done` (1-based): every
    `log_every` steps, or once `log_seconds` (> 0) have passed since the last line."""
    return steps_done % log_every == 0 or 0 < log_seconds <= since_last


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A text bar for a progress line: `[########------------]` (Ray forwards workers' output line
    by line, so a redrawn tqdm bar would arrive as a line per redraw)."""
    filled = min(width, round(width * done / max(total, 1)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"
