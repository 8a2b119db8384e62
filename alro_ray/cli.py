"""`alro` command line: thin wrappers over the library; jobs/*.py call the same functions.

Every command takes `--config FILE.yaml` and config overrides, either as `section.key=value`
or `--section.key value`; the common ones also have short flags (`--history 10`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from alro_ray.config import Config, load_config
from alro_ray.errors import AlroError, ConfigError

log = logging.getLogger("alro_ray")

# short flag -> config key
SHORT_FLAGS = {
    "dataset": "data.dataset",
    "data-dir": "data.data_dir",
    "data": "data.prepared",
    "history": "data.history",
    "candidates": "data.candidates",
    "seed": "data.seed",
    "on-bad-row": "data.on_bad_row",
    "tokenizer": "model.tokenizer",
    "model": "model.name",
    "epochs": "train.epochs",
    "num-workers": "train.num_workers",
    "run-name": "train.run_name",
    "mlflow": "tracking.mlflow",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (configs/*.yaml); defaults fill what it leaves out")
    for flag, key in SHORT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"short_{key}", metavar="VALUE", help=f"sets {key}")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _collect_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Short flags, positional key=value, and unknown `--section.key value` pairs, in that order."""
    overrides = [f"{k[len('short_'):]}={v}" for k, v in vars(args).items()
                 if k.startswith("short_") and v is not None]
    overrides += list(args.overrides)
    it = iter(extra)
    for token in it:
        if not token.startswith("--") and "=" in token:  # key=value after an option (argparse leaves it)
            overrides.append(token)
            continue
        if not token.startswith("--"):
            raise AlroError(f"unexpected argument {token!r}")
        key = token[2:]
        if "=" in key:
            overrides.append(key)
        else:
            value = next(it, None)
            if value is None:
                raise AlroError(f"{token} needs a value")
            overrides.append(f"{key}={value}")
    return overrides


def _split_dotted(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take `--section.key value` / `--section.key=value` out of argv before argparse sees it:
    argparse would hand the value to the positional `overrides` and leave the flag alone."""
    rest, dotted = [], []
    it = iter(argv)
    for token in it:
        if token.startswith("--") and "." in token.split("=", 1)[0]:
            dotted.append(token)
            if "=" not in token:
                value = next(it, None)
                if value is not None:
                    dotted.append(value)
        else:
            rest.append(token)
    return rest, dotted


def build_config(args: argparse.Namespace, extra: list[str]) -> Config:
    if not hasattr(args, "overrides"):  # commands without a config of their own
        if extra:
            raise AlroError(f"unexpected arguments: {' '.join(extra)}")
        return load_config(None)
    overrides = _collect_overrides(args, extra)
    sections = getattr(args, "config_sections", None)  # commands that take only some sections
    for text in overrides if sections else []:
        if text.split("=", 1)[0].strip().lstrip("-").split(".")[0] not in sections:
            raise AlroError(f"alro {args.command} takes only {', '.join(f'{s}.*' for s in sections)} "
                            f"settings, not {text!r}")
    return load_config(getattr(args, "config", None), overrides)


# Each command imports its stage inside its function: `alro --help` and config errors answer
# without loading Ray or torch.


def cmd_prepare(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.data.prepare import prepare

    stats = prepare(cfg, args.out)
    summary = {k: getattr(stats, k) for k in ("users_read", "users_kept", "users_dropped", "rows",
                                      "mean_prompt_tokens", "interactions_read", "interactions_dropped")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'stats.json'}")
    return 0


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.rank.batch_eval import run_evaluation
    from alro_ray.rank.report import metrics_table
    from alro_ray.tracking import log_evaluation, run_in
    from alro_ray.train.trainer import run_training

    outcome = run_training(cfg, args.output_dir)
    print("\nepoch | " + " | ".join(k for k in HISTORY_COLUMNS))
    for h in outcome.history:
        print(f"{h['epoch']:5d} | " + " | ".join(f"{h.get(k, float('nan')):.4f}" for k in HISTORY_COLUMNS))
    if not args.no_test_summary:
        # The evaluation job's own path (Ray Data actor pool), on the held-out test users.
        eval_dir = outcome.output_dir / "eval"
        metrics = run_evaluation(outcome.final_dir, eval_dir, data_dir=outcome.data_dir,
                                 modes=[cfg.train.eval_mode])
        print(f"\nHeld-out test users ({cfg.train.eval_mode} ranking):")
        print(metrics_table(metrics))
        print(f"report: {eval_dir / 'report.md'}")
        log_evaluation(run_in(cfg.tracking, outcome.output_dir), metrics, eval_dir, "eval")  # the training run
    print(f"\nfinal ranker: {outcome.final_dir}")
    return 0


HISTORY_COLUMNS = ("train_loss", "train_sft", "train_rank", "train_perm", "valid_ndcg@3", "valid_ndcg@10")


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.rank.batch_eval import run_evaluation
    from alro_ray.rank.report import metrics_table
    from alro_ray.tracking import evaluation_params, log_evaluation, tracked

    ckpt = Path(args.checkpoint)
    settings = dict(data=args.data, modes=args.modes, baselines=args.baselines, split=args.split, limit=args.limit,
                    seed=args.seed, few_shot=args.few_shot, fuse=args.fuse, fusion=args.fusion)
    # The MLflow run (if tracking.mlflow is set) starts first: a bad store fails before any scoring.
    with tracked(cfg.tracking, f"evaluate {ckpt.resolve().parent.name}/{ckpt.name}",
                 params=evaluation_params(ckpt, **settings), tags={"alro.command": "evaluate"}) as run:
        metrics = run_evaluation(args.checkpoint, args.out, data_dir=args.data, modes=args.modes,
                                 baselines=[b for b in args.baselines.split(",") if b], split=args.split,
                                 actors=args.actors, batch_size=args.batch_size, limit=args.limit, seed=args.seed,
                                 use_gpu=args.gpu, few_shot=args.few_shot,
                                 fuse=[b for b in args.fuse.split(",") if b], fusion=args.fusion,
                                 save_fusion=args.save_fusion)
        log_evaluation(run, metrics, args.out)
    print(metrics_table(metrics))
    print(f"\nwrote {Path(args.out) / 'report.md'}, metrics.json, predictions.parquet and plots")
    return 0


def cmd_compare(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.rank.compare import run_compare

    variants = {}
    for spec in args.variant or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise ConfigError(f"--variant {spec!r}: expected NAME=CONFIG.yaml")
        variants[name.strip()] = load_config(path)
    bootstrap = [p.strip() for p in args.bootstrap.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) >= 2 for p in bootstrap):
        raise ConfigError(f"--bootstrap {args.bootstrap!r}: expected comma-separated integers >= 2, or ''")
    seeds = [x.strip() for x in args.seeds.split(",") if x.strip()]
    if not all(x.isdigit() for x in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {args.seeds!r}: expected distinct comma-separated integers >= 0, or ''")
    run_compare(cfg, args.output_dir, ladder=[x.strip() for x in args.ladder.split(",") if x.strip()],
                baselines=[b for b in args.baselines.split(",") if b], mode=args.mode, few_shot=args.few_shot,
                bootstrap=[int(p) for p in bootstrap], limit=args.limit,
                actors=args.actors, fuse=[b for b in args.fuse.split(",") if b], fusion=args.fusion,
                variants=variants, merge=args.merge or [], seeds=[int(x) for x in seeds])
    print((Path(args.output_dir) / "compare.md").read_text())
    if args.results:  # the files docs/results/<dataset>/ keeps (not the runs and evaluations)
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(args.output_dir).glob("config*.yaml")) + [
                Path(args.output_dir) / n for n in ("compare.json", "compare.md", "details.json", "predictions.parquet")]:
            shutil.copy2(f, dest / f.name)
        print(f"copied the results to {dest}")
    return 0


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.serve.app import adapters_from_args, run_serve

    limits = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
              "num_replicas": args.num_replicas}
    run_serve(adapters_from_args(checkpoint=args.checkpoint, adapter=args.adapter), host=args.host, port=args.port,
              **{k: v for k, v in limits.items() if v is not None})
    return 0


def cmd_cache(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.model.cache import cache_table, clear_states
    from alro_ray.model.loading import cache_root

    root = cache_root(args.cache_dir)
    if args.clear_states:
        files, freed = clear_states(root, args.older_than)
        print(f"deleted {files} stored frozen-states file(s), {freed / 1e6:.1f} MB")
    print(cache_table(root))
    return 0


def _add_fusion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fuse", default="", metavar="BASELINES",
                   help="comma-separated baselines (e.g. mf) to fuse each LLM mode with: adds rows "
                        "fused-<mode>-<baseline>, weight chosen on the valid split (ranked too)")
    p.add_argument("--fusion", default="score", choices=("score", "borda", "rrf"),
                   help="fusion method: z-scored scores, Borda points or reciprocal rank")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alro", description="ALRO list-wise LLM ranker on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw interaction logs -> tokenized ALRO samples (Ray Data)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (train/, valid/, test/, stats.json)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="LoRA fine-tuning with the ALRO objective (Ray Train + DeepSpeed)")
    _add_config_args(p)
    p.add_argument("--output-dir", help="run directory (default: train.output_dir/train.run_name)")
    p.add_argument("--no-test-summary", action="store_true",
                   help="skip scoring the final ranker and baselines on the test split")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a split with a trained ranker (Ray Data actor pool)")
    p.add_argument("--checkpoint", required=True, help="a ranker directory (OUTPUT/final)")
    p.add_argument("--data", help="prepared data directory (default: the one the ranker was trained on)")
    p.add_argument("--modes", default="generate,one-pass,bootstrap@3,bootstrap@5",
                   help="comma-separated: generate, one-pass, free, bootstrap@p")
    p.add_argument("--baselines", default="random,popularity,item-mean",
                   help="comma-separated baselines scored on the same lists ('' for none)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--actors", type=int, default=1, help="ranker actors (one model each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--seed", type=int, default=0, help="seeds bootstrap orders and random baselines")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--few-shot", type=int, default=0, help="prepend k training samples to every prompt")
    _add_fusion_args(p)
    p.add_argument("--save-fusion", action="store_true",
                   help="with --fuse: save the chosen weights in the checkpoint (fusion.json), Serve's "
                        "default when a request's fusion names no weight")
    p.add_argument("--mlflow", dest="short_tracking.mlflow", metavar="URI", help="log an MLflow run (sets tracking.mlflow)")
    p.add_argument("overrides", nargs="*", metavar="tracking.key=value", help="tracking settings (docs/tracking.md)")
    p.set_defaults(func=cmd_evaluate, config_sections=("tracking",))

    p = sub.add_parser("compare", help="baselines and the LLM ladder on the same test lists (paper Tables 2, 4)")
    _add_config_args(p)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--ladder", default="zero-shot,few-shot,SFT,w/o SLL,w/o PSL,ALRO",
                   help="comma-separated steps of the LLM ladder")
    p.add_argument("--baselines", default="random,popularity,item-mean,mf,gru4rec,sasrec")
    p.add_argument("--mode", default="generate", help="ranking mode for every LLM row")
    p.add_argument("--few-shot", type=int, default=2, help="demonstrations for the few-shot row")
    p.add_argument("--bootstrap", default="3,5", help="comma-separated p of the SFT bootstrap@p rows ('' for none)")
    p.add_argument("--limit", type=int, help="score only the first N test users")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--variant", action="append", metavar="NAME=CONFIG",
                   help="also train CONFIG as it is and rank in its train.eval_mode, as row llm-NAME (repeatable)")
    p.add_argument("--merge", action="append", metavar="DIR",
                   help="add the rows of an earlier compare output (or results) DIR on the same test lists "
                        "(repeatable; this run's rows win a name clash)")
    p.add_argument("--seeds", default="", metavar="S0,S1,...",
                   help="train every trained row once per train.seed: the first seed's rows keep their names, "
                        "the others' get -seed<s>; the table adds each recipe's mean over its seeds")
    p.add_argument("--results", metavar="DIR", help="copy the configs, compare.json/md, details.json and "
                                                   "predictions.parquet to DIR (e.g. docs/results/ml100k)")
    _add_fusion_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="serve trained rankers over HTTP (Ray Serve); see docs/serving.md")
    p.add_argument("--checkpoint", help="a ranker directory, served as adapter 'default'")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="another adapter (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, help="dynamic batching: most requests per batch")
    p.add_argument("--batch-wait-timeout-s", type=float, help="dynamic batching: longest wait for a batch")
    p.add_argument("--num-replicas", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cache", help="what the model cache holds; --clear-states frees the frozen LM's stored states")
    p.add_argument("--cache-dir", help="the cache (default: $ALRO_CACHE, else ~/.cache/alro-ray)")
    p.add_argument("--clear-states", action="store_true",
                   help="delete the stored frozen-LM states (train.reuse_frozen_states; read again when needed)")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                   help="with --clear-states: only those not written or read back for DAYS days")
    p.set_defaults(func=cmd_cache)

    from alro_ray.train.tuning import add_tune_args, cmd_tune  # light: imports only yaml and config

    p = sub.add_parser("tune", help="search α, β, γ: Ray Tune + Optuna TPE + ASHA, each trial a Train run")
    _add_config_args(p)
    add_tune_args(p)
    p.set_defaults(func=cmd_tune)
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = make_parser()
    rest, dotted = _split_dotted(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(rest)
    extra += dotted
    try:
        cfg = build_config(args, extra)
        return args.func(args, cfg)
    except AlroError as e:
        print(f"alro {args.command}: error: {e}", file=sys.stderr)
        return 2


def job_main(command: str, argv: list[str], default_config: Path | None = None) -> int:
    """The entry of jobs/*.py (`ray job submit` targets): `alro COMMAND ARGV`, with
    `default_config` when ARGV names no --config."""
    if default_config and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(default_config), *argv]
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
