"""The Ray Train worker: one process per worker runs `train_loop` (the driver side is
trainer.py). It loads the model with LoRA (and the score head), wraps it in DeepSpeed ZeRO,
resumes from the run's last checkpoint, and runs the epochs (epoch.py): each reports its metrics,
the validation NDCG and its part of a checkpoint.

This module imports torch and Ray Train at the top: only workers import it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from alro_ray.cluster import quiet_ray_data
from alro_ray.config import Config, from_dict
from alro_ray.data.dataset import PreparedStats
from alro_ray.data.tokenize import RankTokenizer
from alro_ray.errors import AlroError, NonFiniteError
from alro_ray.model.cache import STATES_DIR
from alro_ray.model.loading import add_lora, cache_root, load_base_model, load_tokenizer
from alro_ray.model.score_head import attach_head
from alro_ray.rank.ranker import save_ranker
from alro_ray.train import guard, lower_states
from alro_ray.train.averaging import AVERAGE_FILE, WeightAverage
from alro_ray.train.checkpoints import DS_TAG, STATE, resume_dir, rng_file, write_part_list
from alro_ray.train.epoch import EpochRun, train_epoch
from alro_ray.train.frozen import read_permuted, read_states, uses_cached_states
from alro_ray.train.objective import checkpointed_layers
from alro_ray.train.shares import share_name
from alro_ray.train.validation import in_row_order, shard_rows, valid_rows, validate

# train.schedule -> transformers' scheduler name (all with linear warmup over warmup_ratio).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class LoopConfig:
    """What the driver hands every worker (Ray Train's `train_loop_config`)."""

    config: dict  # the run's Config as a plain dict (config.to_dict)
    stats: PreparedStats
    data_dir: str
    output_dir: str
    # The driver's resume check (checkpoints.plan_resume): the checkpoint's epoch, and the settings
    # train.override_resume changed from it, which the first epoch trained after it records.
    resume_epoch: int = -1
    resume_overrides: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        """Where Ray Train stores this run's checkpoints (DIR/ray/<run_name>)."""
        return Path(self.output_dir) / "ray" / self.config["train"]["run_name"]


def deepspeed_config(cfg: Config, bf16: bool) -> dict:
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},  # skip non-finite updates (guard.py)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, schedule: str):
    """transformers' schedule: linear warmup over `warmup_ratio` of the steps (none at 0), then
    linear decay to 0, cosine decay to 0, or constant."""
    from transformers import get_scheduler  # transformers' import costs seconds; only this needs it

    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    return get_scheduler(SCHEDULES[schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def say(message: str) -> None:
    """A progress line from a worker. Ray Train patches `print` in workers and tees it (each line
    would reach the driver twice), so write to the real stdout, which Ray forwards once."""
    sys.__stdout__.write(f"[alro] {message}\n")
    sys.__stdout__.flush()


def rng_state() -> dict:
    """This process's random states: torch's (LoRA dropout), CUDA's, Python's and numpy's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy = np.random.get_state(legacy=False)
    state["numpy"] = {**numpy, "state": {**numpy["state"], "key": numpy["state"]["key"].tolist()}}  # loads weights_only
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {**numpy["state"], "key": np.array(numpy["state"]["key"], np.uint32)}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def apply_train_settings(scheduler, t) -> None:
    """The loaded optimizer and schedule state carry the checkpoint's lr and weight decay: set this
    run's (the same unless train.override_resume changed them), and the lr of the step the schedule
    is at, by this run's schedule (train.epochs sets its length)."""
    groups = scheduler.optimizer.param_groups
    for g in groups:
        g["initial_lr"], g["weight_decay"] = t.lr, t.weight_decay
    scheduler.base_lrs = [t.lr] * len(groups)
    for g, fn in zip(groups, scheduler.lr_lambdas):  # transformers' schedules are LambdaLR
        g["lr"] = t.lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


def resume(engine, scheduler, average: WeightAverage, loop_config: LoopConfig, rank: int, world: int,
           say: Callable[[str], None] | None) -> tuple[int, list[dict]]:
    """Load the checkpoint to resume from (checkpoints.resume_dir) into the DeepSpeed engine, the
    weight average and this worker's random states: (the epoch to start at, the history so far),
    or (0, []) when there is none. `say`: where to report it (rank 0), or None."""
    with resume_dir(ray.train.get_checkpoint(), loop_config.run_dir, world, say) as d:
        if d is None:
            return 0, []
        loaded, _ = engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=False)
        if loaded is None:  # DeepSpeed logs why and returns (None, None)
            raise AlroError(f"DeepSpeed loaded nothing from the checkpoint {d / DS_TAG}: it is damaged; move {d} "
                            f"aside to resume from the one before it, or start afresh with another train.run_name")
        state = json.loads((d / STATE).read_text())
        averaged = average.load(d / AVERAGE_FILE)
        rng = d / rng_file(rank)
        if rng.is_file():
            restore_rng(torch.load(rng, weights_only=True))
    apply_train_settings(scheduler, from_dict(Config, loop_config.config).train)
    if say is not None:
        say(f"resumed from the epoch {state['epoch'] + 1} checkpoint ({d.name})")
        if not rng.is_file():
            say("the checkpoint holds no random states (written by an older version): dropout draws anew")
        if average.active and not averaged:
            say(f"the checkpoint has no weight average with decay {average.decay}: averaging from here")
    return state["epoch"] + 1, state["history"]


def save_and_report(engine, tokenizer, cfg: Config, stats: PreparedStats, data_dir: str, history: list[dict],
                    epoch: int, rank: int, metrics: dict, average: WeightAverage) -> None:
    """DeepSpeed's state holds the trained weights (a resume steps on from them), the ranker the
    weight average's (`train.ema_decay`; the weights themselves at 0)."""
    guard.check_weights(engine.module, epoch + 1)  # never a checkpoint of NaN weights
    world = ray.train.get_context().get_world_size()
    try:
        with tempfile.TemporaryDirectory(prefix="alro-ckpt-") as tmp:
            # Every rank saves its optimizer shard; frozen base weights are not saved (LoRA only).
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            torch.save(rng_state(), Path(tmp) / rng_file(rank))
            if rank == 0:
                with average.applied():
                    save_ranker(Path(tmp) / "ranker", engine.module, tokenizer, cfg, stats, data_dir, history)
                if average.active:
                    average.save(Path(tmp) / AVERAGE_FILE)
                (Path(tmp) / STATE).write_text(json.dumps({"epoch": epoch, "history": history, "world": world}))
            write_part_list(Path(tmp), rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
    except OSError as e:  # a full disk, a lost mount: say so, not a traceback from inside DeepSpeed
        raise AlroError(f"writing the epoch {epoch + 1} checkpoint failed on worker {rank}: {e}. The earlier "
                        f"checkpoints and final/ are as they were; free space (or choose another output "
                        f"directory) and rerun: it resumes from the last complete checkpoint") from e


def skip_inference_comm_op() -> None:
    """DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce at its first init
    (28-42 s of C++ on a fresh 2-core machine, again for each new environment path), an op only
    tensor-parallel inference calls. Marked incompatible, it is not built; training is unchanged."""
    import deepspeed.ops  # worker side, like every DeepSpeed import

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_loop(loop_config: LoopConfig) -> None:
    import deepspeed  # inside the worker: a top-level import has crashed CPU-only processes

    skip_inference_comm_op()

    quiet_ray_data(progress=False)
    stopped = guard.read_failure(loop_config.output_dir)
    if stopped:  # Ray Train restarted the workers after a non-finite stop: it would only recur
        raise NonFiniteError(stopped)
    cfg: Config = from_dict(Config, loop_config.config)
    stats = loop_config.stats
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    say(f"worker rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}")
    use_gpu = t.use_gpu and torch.cuda.is_available()
    if use_gpu:  # DeepSpeed places the engine on the current CUDA device
        torch.cuda.set_device(ctx.get_local_rank())
    bf16 = t.precision == "bf16" or (t.precision == "auto" and use_gpu)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    rank_tok = RankTokenizer(tokenizer, stats.candidates)
    head_only = cfg.loss.objective == "score" and cfg.loss.sft_weight == 0  # LoRA below the head (add_lora)
    model = add_lora(load_base_model(cfg.model), cfg.model, head_only)
    attach_head(model, cfg.model)  # the score head, if any: trained and checkpointed beside LoRA
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if t.compile:  # in place (Module.compile): parameter names, hence checkpoints, stay as they are
        model.compile(dynamic=True)

    rows_per_worker = stats.rows["train"] // world
    micro_steps = math.ceil(rows_per_worker / t.micro_batch)
    if t.max_steps_per_epoch:
        micro_steps = min(micro_steps, t.max_steps_per_epoch * t.grad_accum)
    total_steps = max(1, t.epochs * micro_steps // t.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, t.warmup_ratio, t.schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))
    average = WeightAverage(params, t.ema_decay)  # inert at train.ema_decay 0
    # What the engine really runs (train.precision auto depends on the device), in every epoch's metrics.
    engine_setup = {"dtype": str(params[0].dtype).removeprefix("torch."),
                    "gradient_checkpointing": checkpointed_layers(engine.module)}

    start_epoch, history = resume(engine, scheduler, average, loop_config, rank, world, say if rank == 0 else None)
    resumed = start_epoch > 0
    # Recorded once: a worker group restarted later in this run resumes from its own checkpoints.
    overrides = loop_config.resume_overrides if start_epoch == loop_config.resume_epoch + 1 else {}
    if overrides and rank == 0:
        say("resumed with changed settings (train.override_resume): "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in overrides.items()))

    cached = None
    if uses_cached_states(cfg) and start_epoch < t.epochs:  # the frozen LM's states, read once (train/frozen.py)
        splits = (("train", in_row_order(shard_rows(share_name(rank)))),
                  ("valid", valid_rows(cfg, stats, rank, world)))
        store = cache_root(cfg.model.cache_dir) / STATES_DIR if t.reuse_frozen_states else None
        cached = {split: read_states(engine.module, rank_tok, rows, tokenizer.pad_token_id, rank, say, split, store)
                  for split, rows in splits}
        if cfg.loss.beta > 0:  # the consistency term's permuted prompts, each read once too
            read_permuted(engine.module, rank_tok, cached["train"], t.epochs,
                          tokenizer.pad_token_id, rank, say, "train", store)
    lower = None
    if t.cache_lower_layers and start_epoch < t.epochs:  # the frozen layers below LoRA (train/lower_states.py)
        store = cache_root(cfg.model.cache_dir) / STATES_DIR if t.reuse_frozen_states else None
        lower = lower_states.for_worker(engine.module, loop_config.data_dir, store, rank, world)
        if rank == 0:
            say(f"the states below LoRA's layers (layer {lower.layer}): {len(lower.states)} sequences read back"
                + (f" from {lower.path}" if lower.states else "; each is read at its first step"))
    run = EpochRun(
        engine=engine, params=params, cfg=cfg, rank=rank, world=world, micro_steps=micro_steps,
        rank_tok=rank_tok, identifier_ids=torch.tensor(rank_tok.identifier_ids), pad_id=tokenizer.pad_token_id,
        checks=guard.NonFiniteGuard(t.max_nonfinite_steps, sum(h.get("nonfinite_steps", 0) for h in history)),
        # DeepSpeed skips non-finite gradient norms itself under ZeRO and bf16, not in plain fp32.
        own_grad_check=t.zero_stage == 0 and not bf16,
        cached=cached, lower=lower, average=average, say=say)
    try:
        for epoch in range(start_epoch, t.epochs):
            metrics = train_epoch(run, epoch)
            if lower is not None and lower.save() and rank == 0:
                say(f"saved the states below LoRA's layers of {len(lower.states)} sequences to {lower.path}")
            metrics.update(resumed=resumed and epoch == start_epoch, lr=scheduler.get_last_lr()[0], **engine_setup)
            with average.applied():  # validate what the checkpoint's ranker will hold
                metrics.update(validate(engine.module, cfg, stats, rank_tok, tokenizer.pad_token_id, rank, world,
                                        cached["valid"] if cached else None))
            recorded = overrides and epoch == start_epoch
            history.append({**metrics, "resume_overrides": overrides} if recorded else metrics)
            if rank == 0:
                say(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                     if isinstance(v, float)) + f", nonfinite_steps {run.checks.epoch_count}")
            save_and_report(engine, tokenizer, cfg, stats, loop_config.data_dir, history, epoch, rank, metrics, average)
    except NonFiniteError as e:
        if rank == 0:
            guard.write_failure(loop_config.output_dir, str(e))
            say(f"error: {e}")
        raise
    if dist.is_initialized():
        dist.barrier()
