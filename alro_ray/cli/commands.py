"""One function per `alro` command: (parsed args, config) -> exit code."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from alro_ray.config import Config, apply_overrides, load_config
from alro_ray.errors import ConfigError
from alro_ray.files import run_lock
from alro_ray.evaluate.report import metrics_table
from alro_ray.model.cache import cache_table, clear_states
from alro_ray.model.loading import cache_root
from alro_ray.tracking import evaluation_params, log_evaluation, run_in, tracked

# Each command imports its stage inside its function: `alro --help` and config errors answer
# without loading Ray or torch.


def cmd_prepare(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.data.prepare import prepare  # a stage loads on use

    with run_lock(args.out, "alro prepare"):  # one run per output directory (so for evaluate, compare)
        stats = prepare(cfg, args.out)
    summary = {k: getattr(stats, k) for k in ("users_read", "users_kept", "users_dropped", "rows",
                                      "mean_prompt_tokens", "interactions_read", "interactions_dropped")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'stats.json'}")
    return 0


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation  # a stage loads on use
    from alro_ray.train.trainer import run_training  # a stage loads on use

    outcome = run_training(cfg, args.output_dir)
    print("\nepoch | " + " | ".join(k for k in HISTORY_COLUMNS))
    for h in outcome.history:
        print(f"{h['epoch']:5d} | " + " | ".join(f"{h.get(k, float('nan')):.4f}" for k in HISTORY_COLUMNS))
    if not args.no_test_summary:
        # The evaluation job's own path (Ray Data actor pool), on the held-out test users.
        eval_dir = outcome.output_dir / "eval"
        metrics = run_evaluation(outcome.final_dir, eval_dir, outcome.data_dir, EvalSettings(modes=[cfg.train.eval_mode]))
        print(f"\nHeld-out test users ({cfg.train.eval_mode} ranking):")
        print(metrics_table(metrics))
        print(f"report: {eval_dir / 'report.md'}")
        log_evaluation(run_in(cfg.tracking, outcome.output_dir), metrics, eval_dir, "eval")  # the training run
    print(f"\nfinal ranker: {outcome.final_dir}")
    return 0


HISTORY_COLUMNS = ("train_loss", "train_sft", "train_rank", "train_perm", "valid_ndcg@3", "valid_ndcg@10")


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation  # a stage loads on use

    ckpt = Path(args.checkpoint)
    settings = dict(data=args.data, modes=args.modes, baselines=args.baselines, split=args.split, limit=args.limit,
                    seed=args.seed, few_shot=args.few_shot, fuse=args.fuse, fusion=args.fusion, reorders=args.reorders)
    # The MLflow run (if tracking.mlflow is set) starts first: a bad store fails before any scoring.
    with run_lock(args.out, "alro evaluate"), tracked(
            cfg.tracking, f"evaluate {ckpt.resolve().parent.name}/{ckpt.name}",
            params=evaluation_params(ckpt, **settings), tags={"alro.command": "evaluate"}) as run:
        metrics = run_evaluation(args.checkpoint, args.out, args.data, EvalSettings(
            modes=args.modes, baselines=[b for b in args.baselines.split(",") if b], split=args.split,
            actors=args.actors, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, limit=args.limit,
            seed=args.seed, use_gpu=args.gpu, few_shot=args.few_shot, fuse=[b for b in args.fuse.split(",") if b],
            fusion=args.fusion, save_fusion=args.save_fusion, reorders=args.reorders,
            reuse_states=args.reuse_states))
        log_evaluation(run, metrics, args.out)
    print(metrics_table(metrics))
    print(f"\nwrote {Path(args.out) / 'report.md'}, metrics.json, predictions.parquet and plots")
    return 0


def parse_seeds(text: str) -> list[int]:
    """`--seeds S0,S1,...` (alro compare, alro claims): distinct integers >= 0; '' gives none."""
    seeds = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isdigit() for x in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct comma-separated integers >= 0, or ''")
    return [int(x) for x in seeds]


def cmd_compare(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.evaluate.compare import CompareSettings, run_compare  # a stage loads on use

    variants = {}
    for spec in args.variant or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise ConfigError(f"--variant {spec!r}: expected NAME=CONFIG.yaml")
        variants[name.strip()] = load_config(path)
    bootstrap = [p.strip() for p in args.bootstrap.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) >= 2 for p in bootstrap):
        raise ConfigError(f"--bootstrap {args.bootstrap!r}: expected comma-separated integers >= 2, or ''")
    seeds = parse_seeds(args.seeds)
    settings = CompareSettings(
        ladder=[x.strip() for x in args.ladder.split(",") if x.strip()],
        baselines=[b for b in args.baselines.split(",") if b], mode=args.mode, few_shot=args.few_shot,
        bootstrap=[int(p) for p in bootstrap], limit=args.limit, actors=args.actors,
        fuse=[b for b in args.fuse.split(",") if b], fusion=args.fusion, variants=variants, merge=args.merge or [],
        seeds=seeds, reorders=args.reorders, reuse_states=args.reuse_states)
    with run_lock(args.output_dir, "alro compare"):
        run_compare(cfg, args.output_dir, settings)
    print((Path(args.output_dir) / "compare.md").read_text())
    if args.results:  # the files docs/results/<dataset>/ keeps (not the runs and evaluations)
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(args.output_dir).glob("config*.yaml")) + [
                Path(args.output_dir) / n for n in ("compare.json", "compare.md", "details.json", "predictions.parquet")]:
            shutil.copy2(f, dest / f.name)
        print(f"copied the results to {dest}")
    return 0


def cmd_claims(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.evaluate.claims import CLAIMS_OF, Ladder, claims_table, measure_claims, write_claims  # loads on use

    seeds = parse_seeds(args.seeds)
    if not seeds:
        raise ConfigError(f"--seeds {args.seeds!r}: expected the compare's seeds, comma-separated")
    if args.bootstrap < 2:
        raise ConfigError(f"--bootstrap {args.bootstrap}: expected K >= 2")
    ladder = Ladder(path=args.path, alro=args.alro, sft=args.sft, wo_sll=args.wo_sll, wo_psl=args.wo_psl,
                    seeds=seeds, mode=args.mode, bootstrap=args.bootstrap)
    records = measure_claims(args.compare, ladder)
    out = Path(args.out or Path(args.compare) / "claims.json")
    write_claims(records, out)
    print(claims_table(records))
    left_out = [c for role, claims in CLAIMS_OF.items() if getattr(ladder, role) is None for c in claims]
    if left_out:
        print(f"left out (no reference row named): {', '.join(left_out)}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.serve.app import adapters_from_args, run_serve  # a stage loads on use

    limits = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
              "num_replicas": args.num_replicas, "max_queued_requests": args.max_queued_requests,
              "request_timeout_s": args.request_timeout_s}
    others = dict(apply_overrides({}, args.set))  # KEY=VALUE, typed and checked by ServeSettings
    run_serve(adapters_from_args(checkpoint=args.checkpoint, adapter=args.adapter), host=args.host, port=args.port,
              app_name=args.app_name, route_prefix=args.route_prefix,
              **others, **{k: v for k, v in limits.items() if v is not None})
    return 0  # also after Ctrl-C or SIGTERM: the app was removed after its requests in flight


def cmd_cache(args: argparse.Namespace, cfg: Config) -> int:

    root = cache_root(args.cache_dir)
    if args.clear_states:
        files, freed = clear_states(root, args.older_than)
        print(f"deleted {files} stored frozen-states file(s), {freed / 1e6:.1f} MB")
    print(cache_table(root))
    return 0


def cmd_tune(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.tune.report import fmt  # a stage loads on use
    from alro_ray.tune.space import check_tune_config  # a stage loads on use
    from alro_ray.tune.study import EXIT_INTERRUPTED, run_tune  # a stage loads on use

    if args.num_samples is not None:
        cfg.tune.num_samples = args.num_samples
    if args.max_concurrent is not None:
        cfg.tune.max_concurrent = args.max_concurrent
    check_tune_config(cfg)  # a ConfigError here exits 2 before anything starts
    outcome = run_tune(cfg, args.output_dir, stop_after_trials=args.stop_after_trials)
    print(f"\nStudy {cfg.tune.name!r} ({cfg.tune.metric}, last reported epoch; * best):")
    print(outcome.table)
    print("\nparameter importances: " + (", ".join(f"{k} {v:.3f}" for k, v in outcome.importances.items())
                                          or outcome.importance_note))
    print(f"trial table: {outcome.output_dir / 'trials.md'} and trials.json")
    print(f"plot:        {outcome.plot}")
    if outcome.best:
        b = outcome.best
        print(f"best trial:  {b['trial_id']} " + ", ".join(f"{k}={fmt(v)}" for k, v in b["params"].items())
              + f" -> {cfg.tune.metric} {b[cfg.tune.metric]:.4f}")
        print(f"best config: {outcome.best_yaml}  (alro train --config {outcome.best_yaml})")
        print(f"best ranker: {outcome.best_checkpoint}")
    if not outcome.complete:
        print("\nthe study stopped before its last trial ended: rerun the same command to resume it")
        return EXIT_INTERRUPTED
    if not outcome.best:
        print("\nno trial finished an epoch: see the failed trials' errors above", file=sys.stderr)
        return 1
    return 0
