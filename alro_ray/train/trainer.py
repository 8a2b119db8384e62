"""ALRO fine-tuning on Ray Train: LoRA under DeepSpeed ZeRO, one process per worker.

`run_training` (driver) checks everything it can before a worker starts, prepares the data if
the config names a dataset, then runs a `TorchTrainer` whose workers execute `train_loop`.
Each epoch every worker reports its losses, the validation NDCG and its part of a checkpoint
(checkpoints.py). A rerun with the same output directory and run name resumes from the last
checkpoint, and `FailureConfig` restarts a crashed worker group from it. NaN/inf losses and
gradients skip their update on every worker; too many stop the run (guard.py). With a frozen LM
(`model.freeze_lm`) the workers read its states once and fit the score head on them (frozen.py).

Output directory layout:
  DIR/data/                       prepared data (when the config names a dataset)
  DIR/shares/train_R.parquet      worker R's share of the train split (shares.py)
  DIR/ray/<run_name>/epoch_NNN/   Ray Train checkpoints (DeepSpeed state + ranker/)
  DIR/final/                      the final ranker (see checkpoint.py)
  DIR/history.json                per-epoch metrics
  DIR/nonfinite_error.txt         why the last run stopped on NaN/inf (see guard.py)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alro_ray.config import Config, from_dict, to_dict
from alro_ray.compat import check_training
from alro_ray.data.dataset import read_stats
from alro_ray.errors import AlroError, DataError, NonFiniteError
from alro_ray.train import guard
from alro_ray.train.checkpoints import check_resume_world, resume, save_and_report, set_aside_final

log = logging.getLogger("alro_ray")

# train.schedule -> transformers' scheduler name (all with linear warmup over warmup_ratio).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
KEEP_METRIC = "valid_ndcg@10"  # what train.keep: best picks the final ranker's epoch by


@dataclass
class TrainOutcome:
    output_dir: Path
    final_dir: Path
    history: list[dict]
    data_dir: Path


# ---------------------------------------------------------------------------------------------
# Driver side.


def resolve_data(cfg: Config, out: Path) -> Path:
    """The prepared data directory: the configured one, or DIR/data prepared now (once)."""
    from alro_ray.data.prepare import prepare

    if cfg.data.prepared:
        data_dir = Path(cfg.data.prepared).resolve()
        read_stats(data_dir)
        return data_dir
    data_dir = out / "data"
    try:
        stats = read_stats(data_dir)
        if stats.config["data"] == to_dict(cfg.data):
            log.info("using the data prepared earlier in %s", data_dir)
            return data_dir
    except DataError:
        pass
    prepare(cfg, data_dir)
    return data_dir


def check_writable(out: Path) -> None:
    """Write a small file into the output directory now, rather than fail after training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".alro-write-probe"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as e:
        raise AlroError(f"cannot write to the output directory {out}: {e.strerror or e}. Choose a writable "
                        f"directory with free space (--output-dir, or train.output_dir and train.run_name)") from None


def run_training(cfg: Config, output_dir: str | Path | None = None,
                 callbacks: list | None = None, tracking_parent: str | None = None) -> TrainOutcome:
    """`callbacks`: extra Ray Train `RunConfig` callbacks (tuning.py passes Tune's
    `TuneReportCallback` so every epoch's metrics reach the Tune scheduler). `tracking_parent`:
    the MLflow run to nest this run's under (a study's, a comparison's; see tracking.py)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from alro_ray.cluster import ensure_ray, quiet_ray_data
    from alro_ray.model.loading import prepare_model_cache
    from alro_ray.train.shares import ordered_ingest, share_datasets
    from alro_ray.train.train_tracking import TrainTracking

    out = Path(output_dir or Path(cfg.train.output_dir) / cfg.train.run_name).resolve()
    check_writable(out)
    (out / guard.FAILURE_FILE).unlink(missing_ok=True)  # a stop of an earlier run
    prepare_model_cache(cfg.model)  # once here, not in every worker
    ensure_ray()
    data_dir = resolve_data(cfg, out)
    stats = read_stats(data_dir)
    check_training(cfg, stats)
    check_resume_world(out / "ray" / cfg.train.run_name, cfg.train.num_workers)
    tracked = TrainTracking.start(cfg, out, tracking_parent)  # an MLflow run, if tracking.mlflow is set

    t = cfg.train
    quiet_ray_data(progress=False)
    # Read before the workers start, in tasks that reserve no CPU: Train workers (and, under Tune,
    # other trials' workers) may hold every CPU, and a 1-CPU read task would then wait forever.
    # Each worker reads its own fixed share of train (shares.py) and all of valid.
    datasets = share_datasets(data_dir, t.num_workers, out / "shares") if stats.rows["train"] else {}
    if stats.rows["valid"]:
        datasets["valid"] = ray.data.read_parquet(str(data_dir / "valid"), num_cpus=0).materialize()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "stats": stats, "data_dir": str(data_dir),
                           "output_dir": str(out)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"GPU": t.gpus_per_worker, "CPU": t.cpus_per_worker} if t.use_gpu
            else {"CPU": t.cpus_per_worker},
        ),
        # Nothing is split by Ray: every worker iterates its own train share and all of valid
        # (scoring its own share of it), in the files' order (the seeded local shuffle aside).
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ordered_ingest()),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            # Ray keeps the latest checkpoint (resume) besides the 2 best by the score, if one is set.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, **(
                {"checkpoint_score_attribute": KEEP_METRIC, "checkpoint_score_order": "max"}
                if t.keep == "best" else {})),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # MLflow's epoch logger first: Tune may stop the trial as soon as its callback hears of the epoch.
            callbacks=[*tracked.callbacks(), *(callbacks or [])],
        ),
    )
    try:
        result = trainer.fit()
        error = result.error
    except ray.train.TrainingFailedError as e:
        error = e
    if error is not None:
        tracked.failed()
    if error is not None and guard.read_failure(out):
        raise NonFiniteError(guard.read_failure(out) + set_aside_final(out)) from None
    if error is not None:
        raise error
    if result.checkpoint is None:
        raise AlroError(f"training finished without a checkpoint ({result.error})")
    final = out / "final"
    kept = kept_checkpoint(result) if t.keep == "best" else result.checkpoint
    with kept.as_directory() as ckpt:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(Path(ckpt) / "ranker", final)
        state = json.loads((Path(ckpt) / "state.json").read_text())
    epoch, history = state["epoch"] + 1, state["history"]
    if kept.path != result.checkpoint.path:  # the whole run's history is in the latest checkpoint
        with result.checkpoint.as_directory() as ckpt:
            history = json.loads((Path(ckpt) / "state.json").read_text())["history"]
    (out / "history.json").write_text(json.dumps(history, indent=2))
    log.info("final ranker in %s (epoch %d of %d, train.keep: %s)", final, epoch, len(history), t.keep)
    tracked.finished(out)
    return TrainOutcome(out, final, history, data_dir)


# ---------------------------------------------------------------------------------------------
# Worker side.


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
    from transformers import get_scheduler  # heavy; the driver does not need it

    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    return get_scheduler(SCHEDULES[schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def say(message: str) -> None:
    """A progress line from a worker. Ray Train patches `print` in workers and tees it (each line
    would reach the driver twice), so write to the real stdout, which Ray forwards once."""
    sys.__stdout__.write(f"[alro] {message}\n")
    sys.__stdout__.flush()


def kept_checkpoint(result):
    """train.keep: best: of the checkpoints Ray kept (the 2 best by KEEP_METRIC and the latest),
    the one with the best KEEP_METRIC; ties: the earliest epoch."""
    scored = [(m[KEEP_METRIC], -m["epoch"], c) for c, m in result.best_checkpoints if KEEP_METRIC in m]
    if not scored:
        raise AlroError(f"train.keep: best, but no epoch reported {KEEP_METRIC}")
    return max(scored, key=lambda x: x[:2])[2]


def train_loop(loop_config: dict) -> None:
    import deepspeed  # inside the worker: a top-level import has crashed CPU-only processes
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from alro_ray.cluster import quiet_ray_data
    from alro_ray.data.tokenize import RankTokenizer
    from alro_ray.model.loading import add_lora, cache_root, load_base_model, load_tokenizer
    from alro_ray.model.score_head import attach_head
    from alro_ray.train.averaging import WeightAverage
    from alro_ray.train.frozen import read_states, uses_cached_states
    from alro_ray.train.shares import share_name
    from alro_ray.train.validation import in_row_order, shard_rows, valid_rows, validate

    quiet_ray_data(progress=False)
    stopped = guard.read_failure(loop_config["output_dir"])
    if stopped:  # Ray Train restarted the workers after a non-finite stop: it would only recur
        raise NonFiniteError(stopped)
    cfg: Config = from_dict(Config, loop_config["config"])
    stats = loop_config["stats"]
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
    identifier_ids = torch.tensor(rank_tok.identifier_ids)
    model = add_lora(load_base_model(cfg.model), cfg.model)
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

    start_epoch, history = resume(engine, average, Path(loop_config["output_dir"]) / "ray" / t.run_name, world,
                                  say if rank == 0 else None)
    resumed = start_epoch > 0

    checks = guard.NonFiniteGuard(t.max_nonfinite_steps, sum(h.get("nonfinite_steps", 0) for h in history))
    # DeepSpeed skips non-finite gradient norms itself under ZeRO and bf16, not in plain fp32.
    own_grad_check = t.zero_stage == 0 and not bf16
    cached = None
    if uses_cached_states(cfg) and start_epoch < t.epochs:  # the frozen LM's states, read once (train/frozen.py)
        splits = (("train", in_row_order(shard_rows(share_name(rank)))),
                  ("valid", valid_rows(cfg, stats, rank, world)))
        store = cache_root(cfg.model.cache_dir) / "frozen-states" if t.reuse_frozen_states else None
        cached = {split: read_states(engine.module, rank_tok, rows, tokenizer.pad_token_id, rank, say, split, store)
                  for split, rows in splits}
    try:
        for epoch in range(start_epoch, t.epochs):
            metrics = train_epoch(engine, params, checks, own_grad_check, cfg, epoch, micro_steps, rank, world,
                                  rank_tok, identifier_ids, tokenizer.pad_token_id, cached, average)
            metrics.update(resumed=resumed and epoch == start_epoch, lr=scheduler.get_last_lr()[0])
            with average.applied():  # validate what the checkpoint's ranker will hold
                metrics.update(validate(engine.module, cfg, stats, rank_tok, tokenizer.pad_token_id, rank, world,
                                        cached["valid"] if cached else None))
            history.append(metrics)
            if rank == 0:
                say(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                     if isinstance(v, float)) + f", nonfinite_steps {checks.epoch_count}")
            save_and_report(engine, tokenizer, cfg, stats, loop_config["data_dir"], history, epoch, rank, metrics, average)
    except NonFiniteError as e:
        if rank == 0:
            guard.write_failure(loop_config["output_dir"], str(e))
            say(f"error: {e}")
        raise
    if dist.is_initialized():
        dist.barrier()


def train_epoch(engine, params, checks, own_grad_check: bool, cfg: Config, epoch: int, micro_steps: int,
                rank: int, world: int, rank_tok, identifier_ids, pad_id: int, cached: dict | None, average) -> dict:
    """One pass over this worker's shard (or over its frozen LM's cached states, `cached`:
    train/frozen.py); skips non-finite updates on every worker alike (guard.py); `average`
    (train/averaging.py) takes in every applied step."""
    import ray.train

    from alro_ray.model.score_head import head_of, scorer_of
    from alro_ray.train import frozen
    from alro_ray.train.batching import MicroBatchCollate
    from alro_ray.train.objective import compute_losses, step_loss
    from alro_ray.train.shares import share_name

    t = cfg.train
    engine.train()
    checks.start_epoch()
    sums = {"loss": 0.0, "sft": 0.0, "rank": 0.0, "perm": 0.0}
    n, samples, tokens, t0, window = 0, 0, 0, time.time(), []
    if cached is not None:
        # a shuffle of its own per worker and epoch
        batches = cached["train"].micro_batches(t.micro_batch, seed=t.seed + 1000 * epoch + rank, steps=micro_steps)
    else:
        # Each block of micro_batch * bucket rows is cut into length-bucketed micro-batches and collated
        # to tensors by Ray Data's prefetch thread (train/batching.py) while the previous step runs.
        collate_fn = MicroBatchCollate(t.micro_batch, t.bucket, seed=t.seed + epoch,
                                       perm_index=epoch if cfg.loss.beta > 0 else None)
        blocks = ray.train.get_dataset_shard(share_name(rank)).iter_torch_batches(
            batch_size=t.micro_batch * t.bucket, collate_fn=collate_fn, prefetch_batches=2,
            local_shuffle_buffer_size=256, local_shuffle_seed=t.seed + epoch)
        batches = (b for block in blocks for b in block)
    for step, batch in enumerate(batches):
        if step >= micro_steps:
            break
        loss_cfg = step_loss(cfg.loss, t.seed + rank, epoch, step)
        users = batch.users
        if cached is not None:
            terms = frozen.losses(head_of(engine), batch, loss_cfg)
        else:
            if loss_cfg.beta == 0:
                batch = batch.without_permutation()
            terms = compute_losses(engine, batch, identifier_ids, loss_cfg, pad_id, len(rank_tok.header_ids),
                                   shared_prefix=t.shared_prefix, scorer=scorer_of(engine, rank_tok))
        where = (epoch + 1, f"{step // t.grad_accum + 1} (micro-batch {step % t.grad_accum + 1}/{t.grad_accum})")
        finite = guard.loss_is_finite(terms.total)
        if guard.any_rank(not finite):  # every worker drops this micro-batch: no backward, no step
            checks.skipped("loss", *where, guard.gather_users([] if finite else users))
            if rank == 0:
                say(f"skipped: {checks.last}")
            continue
        window += users
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(terms.total)
        bad_grad = boundary and own_grad_check and guard.any_rank(not guard.grads_finite(params))
        if bad_grad:  # AdamW leaves parameters without a gradient alone
            for p in params:
                p.grad = None
        engine.step()
        if boundary:
            if bad_grad or not engine.was_step_applied():
                checks.skipped("gradient norm", *where, guard.gather_users(window))
                if rank == 0:
                    say(f"skipped: {checks.last}")
            else:
                average.update()
            window = []
        for key, value in (("loss", terms.total), ("sft", terms.sft), ("rank", terms.rank), ("perm", terms.perm)):
            sums[key] += float(value.detach())
        n += 1
        samples += batch.size
        tokens += batch.tokens
        if rank == 0 and (step + 1) % (t.log_every * t.grad_accum) == 0:
            skipped = f", {checks.epoch_count} non-finite skipped (last: {checks.last})" if checks.epoch_count else ""
            say(f"epoch {epoch + 1}/{t.epochs} step {(step + 1) // t.grad_accum}/{micro_steps // t.grad_accum} "
                f"loss {sums['loss'] / max(n, 1):.4f} (sft {sums['sft'] / max(n, 1):.4f} "
                f"rank {sums['rank'] / max(n, 1):.4f} perm {sums['perm'] / max(n, 1):.4f}) "
                f"{tokens * world / (time.time() - t0):.0f} tok/s{skipped}")
    seconds = time.time() - t0
    metrics = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
    # samples: this worker's times the world size (every worker runs the same number of micro-steps)
    metrics.update(epoch=epoch + 1, train_seconds=seconds, train_samples=samples * world,
                   tokens_per_s=tokens * world / max(seconds, 1e-9), nonfinite_steps=checks.epoch_count)
    return metrics
