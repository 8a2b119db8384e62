"""ALRO fine-tuning on Ray Train: LoRA under DeepSpeed ZeRO, one process per worker.

`run_training` (driver) checks everything it can before a worker starts, prepares the data if
the config names a dataset, then runs a `TorchTrainer` whose workers execute `train_loop`.
Each epoch every worker reports its losses, the validation NDCG and its part of a DeepSpeed
checkpoint (ZeRO-2 shards the optimizer state, so every rank saves); rank 0 adds the ranker
(adapter, tokenizer, config) to it. A rerun with the same output directory and run name resumes
from the last checkpoint, and `FailureConfig` restarts a crashed worker group from it.

Output directory layout:
  DIR/data/                       prepared data (when the config names a dataset)
  DIR/ray/<run_name>/epoch_NNN/   Ray Train checkpoints (DeepSpeed state + ranker/)
  DIR/final/                      the final ranker (see checkpoint.py)
  DIR/history.json                per-epoch metrics
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from alro_ray.config import Config, from_dict, to_dict
from alro_ray.errors import AlroError, DataError

log = logging.getLogger("alro_ray")

DS_TAG = "ds"


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
    from alro_ray.data.prepare import prepare, read_stats

    if cfg.data.prepared:
        data_dir = Path(cfg.data.prepared).resolve()
        read_stats(data_dir)
        return data_dir
    data_dir = out / "data"
    try:
        stats = read_stats(data_dir)
        if stats["config"]["data"] == to_dict(cfg.data):
            log.info("using the data prepared earlier in %s", data_dir)
            return data_dir
    except DataError:
        pass
    prepare(cfg, data_dir)
    return data_dir


def check_data_fits(cfg: Config, stats: dict) -> None:
    """Refuse data that this model or loss cannot train on, before any worker starts."""
    from alro_ray.model.loading import load_tokenizer
    from alro_ray.data.tokenize import identifier_token_ids

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    ids = identifier_token_ids(tok, stats["candidates"])
    if ids != stats["identifier_ids"]:
        raise AlroError(
            f"the data was prepared with tokenizer {stats['tokenizer']!r}, whose identifier ids differ "
            f"from model {cfg.model.name!r}'s tokenizer; prepare it again with --tokenizer {cfg.model.name}"
        )
    if cfg.loss.beta > 0 and stats["config"]["data"]["permutations"] < 1:
        raise AlroError("loss.beta > 0 needs permuted prompts: prepare the data with data.permutations >= 1")
    if stats["rows"]["train"] < cfg.train.num_workers:
        raise AlroError(f"{stats['rows']['train']} training rows for {cfg.train.num_workers} workers")


def check_resume_world(run_dir: Path, num_workers: int) -> None:
    """A rerun resumes from the run's checkpoints, whose ZeRO optimizer state is sharded one
    file per worker: a different worker count cannot load it, so say so before workers start."""
    for d in sorted(run_dir.glob("epoch_*")):
        shards = _optimizer_shards(d)
        if (d / "state.json").is_file() and shards and shards != num_workers:
            raise AlroError(
                f"{d} was written by {shards} workers and this run has train.num_workers={num_workers}: "
                f"resume with train.num_workers={shards}, or start afresh with another train.run_name "
                f"or output directory")


def run_training(cfg: Config, output_dir: str | Path | None = None,
                 callbacks: list | None = None) -> TrainOutcome:
    """`callbacks`: extra Ray Train `RunConfig` callbacks (tuning.py passes Tune's
    `TuneReportCallback` so every epoch's metrics reach the Tune scheduler)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from alro_ray.cluster import ensure_ray, quiet_ray_data
    from alro_ray.data.prepare import read_stats

    out = Path(output_dir or Path(cfg.train.output_dir) / cfg.train.run_name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    data_dir = resolve_data(cfg, out)
    stats = read_stats(data_dir)
    check_data_fits(cfg, stats)
    check_resume_world(out / "ray" / cfg.train.run_name, cfg.train.num_workers)

    t = cfg.train
    quiet_ray_data(progress=False)
    # Read before the workers start, in tasks that reserve no CPU: Train workers (and, under Tune,
    # other trials' workers) may hold every CPU, and a 1-CPU read task would then wait forever.
    datasets = {split: ray.data.read_parquet(str(data_dir / split), ray_remote_args={"num_cpus": 0}).materialize()
                for split in ("train", "valid") if stats["rows"][split]}
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
        # Only train is split: every worker reads all of valid and scores its own share of it.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise AlroError(f"training finished without a checkpoint ({result.error})")
    final = out / "final"
    with result.checkpoint.as_directory() as ckpt:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(Path(ckpt) / "ranker", final)
        history = json.loads((Path(ckpt) / "state.json").read_text())["history"]
    (out / "history.json").write_text(json.dumps(history, indent=2))
    log.info("final ranker in %s", final)
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
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


def say(message: str) -> None:
    """A progress line from a worker. Ray Train patches `print` in workers and tees it (each line
    would reach the driver twice), so write to the real stdout, which Ray forwards once."""
    sys.__stdout__.write(f"[alro] {message}\n")
    sys.__stdout__.flush()


def train_loop(loop_config: dict) -> None:
    import deepspeed  # inside the worker: a top-level import has crashed CPU-only processes
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
    from alro_ray.train.objective import collate, compute_losses
    from alro_ray.data.tokenize import RankTokenizer

    from alro_ray.cluster import quiet_ray_data

    quiet_ray_data(progress=False)
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
    rank_tok = RankTokenizer(tokenizer, stats["candidates"])
    identifier_ids = torch.tensor(rank_tok.identifier_ids)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    rows_per_worker = stats["rows"]["train"] // world
    micro_steps = math.ceil(rows_per_worker / t.micro_batch)
    if t.max_steps_per_epoch:
        micro_steps = min(micro_steps, t.max_steps_per_epoch * t.grad_accum)
    total_steps = max(1, t.epochs * micro_steps // t.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, t.warmup_ratio, t.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))

    start_epoch, history, resumed = 0, [], False
    with resume_dir(ray.train.get_checkpoint(), Path(loop_config["output_dir"]) / "ray" / t.run_name,
                    world) as d:
        if d is not None:
            engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=False)
            state = json.loads((d / "state.json").read_text())
            start_epoch, history, resumed = state["epoch"] + 1, state["history"], True
            if rank == 0:
                say(f"resumed from the epoch {state['epoch'] + 1} checkpoint ({d.name})")

    for epoch in range(start_epoch, t.epochs):
        engine.train()
        sums = {"loss": 0.0, "sft": 0.0, "rank": 0.0, "perm": 0.0}
        n, tokens, t0 = 0, 0, time.time()
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_batches(batch_size=t.micro_batch, batch_format="numpy",
                                     local_shuffle_buffer_size=256, local_shuffle_seed=t.seed + epoch)
        for step, rows in enumerate(batches):
            if step >= micro_steps:
                break
            batch = collate(rows, perm_index=epoch if cfg.loss.beta > 0 else None)
            terms = compute_losses(engine, batch, identifier_ids, cfg.loss, tokenizer.pad_token_id,
                                   len(rank_tok.header_ids), shared_prefix=t.shared_prefix)
            engine.backward(terms.total)
            engine.step()
            if step + 1 == t.grad_accum:
                maybe_inject_failure(loop_config, epoch, rank)
            for key, value in (("loss", terms.total), ("sft", terms.sft), ("rank", terms.rank), ("perm", terms.perm)):
                sums[key] += float(value.detach())
            n += 1
            tokens += sum(len(s) for s in batch.input_ids) + sum(len(s) for s in (batch.perm_input_ids or []))
            if rank == 0 and (step + 1) % (t.log_every * t.grad_accum) == 0:
                say(f"epoch {epoch + 1}/{t.epochs} step {(step + 1) // t.grad_accum}/{micro_steps // t.grad_accum} "
                    f"loss {sums['loss'] / n:.4f} (sft {sums['sft'] / n:.4f} rank {sums['rank'] / n:.4f} "
                    f"perm {sums['perm'] / n:.4f}) {tokens * world / (time.time() - t0):.0f} tok/s")
        seconds = time.time() - t0
        metrics = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, resumed=resumed and epoch == start_epoch, train_seconds=seconds, tokens_per_s=tokens * world / max(seconds, 1e-9),
                       lr=scheduler.get_last_lr()[0])
        metrics.update(validate(engine.module, cfg, stats, rank_tok, tokenizer.pad_token_id, rank, world))
        history.append(metrics)
        if rank == 0:
            say(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        save_and_report(engine, tokenizer, cfg, stats, loop_config["data_dir"], history, epoch, rank, metrics)
    if dist.is_initialized():
        dist.barrier()


def _complete(d: Path, world: int) -> bool:
    """Every rank's part is there: rank 0's state and one ZeRO optimizer shard per rank."""
    return (d / "state.json").is_file() and _optimizer_shards(d) == world


def _optimizer_shards(d: Path) -> int:
    """ZeRO writes one optimizer-state file per rank."""
    return len(list((d / DS_TAG).glob("*optim_states.pt")))


def _epoch_of(d: Path | None) -> int:
    return json.loads((d / "state.json").read_text())["epoch"] if d is not None else -1


@contextlib.contextmanager
def resume_dir(checkpoint, run_dir: Path, world: int):
    """The checkpoint to resume from: the newer of Ray's latest registered checkpoint and the
    latest complete one in the run's storage. A worker that crashes right after reporting can
    die before Ray's controller registers that report, though its files are already stored;
    without the scan the restarted group would begin from an older checkpoint or from scratch.
    (The scan covers local and mounted storage; remote URIs rely on Ray's record alone.)"""
    on_disk = max((d for d in run_dir.glob("epoch_*") if _complete(d, world)), key=_epoch_of, default=None)
    if checkpoint is None:
        yield on_disk
        return
    with checkpoint.as_directory() as d:
        registered = Path(d)
        yield on_disk if _epoch_of(on_disk) > _epoch_of(registered) else registered


def validate(model, cfg: Config, stats: dict, rank_tok, pad_id: int, rank: int, world: int) -> dict:
    """NDCG on this worker's share of the valid split, gathered over all workers."""
    import ray.train
    import torch
    import torch.distributed as dist

    from alro_ray.rank.evaluation import ndcg_summary, rank_rows, ranked_relevance

    mine: list[list[float]] = []
    if stats["rows"]["valid"]:
        rows = [r for b in ray.train.get_dataset_shard("valid").iter_batches(batch_size=64, batch_format="pandas")
                for r in b.to_dict("records")]
        rows = rows[: cfg.train.eval_users] if cfg.train.eval_users else rows
        rows = rows[rank::world]
        model.eval()
        with torch.no_grad():
            orders = rank_rows(model, rows, rank_tok.identifier_ids, pad_id, cfg.train.eval_mode)
        model.train()
        mine = ranked_relevance(rows, orders)
    gathered = [None] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    summary = ndcg_summary([r for part in gathered for r in part])
    return {f"valid_{k}": v for k, v in summary.items() if k.startswith("ndcg") and v is not None}


def save_and_report(engine, tokenizer, cfg: Config, stats: dict, data_dir: str, history: list[dict],
                    epoch: int, rank: int, metrics: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from alro_ray.model.checkpoint import save_ranker

    with tempfile.TemporaryDirectory(prefix="alro-ckpt-") as tmp:
        # Every rank saves its optimizer shard; frozen base weights are not saved (LoRA only).
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            save_ranker(Path(tmp) / "ranker", engine.module, tokenizer, cfg, stats, data_dir, history)
            (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch + 1:03d}")


def maybe_inject_failure(loop_config: dict, epoch: int, rank: int) -> None:
    """Fault injection for recovery tests: crash rank 1 (or 0) once, after the epoch's first step."""
    at = loop_config["config"]["train"].get("inject_failure_epoch")
    if at is None or epoch != at - 1 or rank != min(1, loop_config["config"]["train"]["num_workers"] - 1):
        return
    marker = Path(loop_config["output_dir"]) / "injected_failure"
    if not marker.exists():
        marker.write_text(f"epoch {epoch + 1}\n")
        say(f"injected failure on rank {rank} at epoch {epoch + 1}")
        os._exit(1)
