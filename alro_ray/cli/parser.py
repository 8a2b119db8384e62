"""The `alro` argument parser: one sub-command per stage, each set to its function in `commands`."""

from __future__ import annotations

import argparse

from alro_ray.cli import commands

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


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (configs/*.yaml); defaults fill what it leaves out")
    for flag, key in SHORT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"short_{key}", metavar="VALUE", help=f"sets {key}")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_fusion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fuse", default="", metavar="BASELINES",
                   help="comma-separated baselines (e.g. mf) to fuse each LLM mode with: adds rows "
                        "fused-<mode>-<baseline>, weight chosen on the valid split (ranked too)")
    p.add_argument("--fusion", default="score", choices=("score", "borda", "rrf"),
                   help="fusion method: z-scored scores, Borda points or reciprocal rank")


def add_reorders_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reorders", type=int, default=0, metavar="P",
                   help="also rank every scored list under P seeded reorders of its candidates (LLM modes): "
                        "Kendall tau between the rankings, the spread of NDCG@10 across them (0: off)")
    p.add_argument("--reuse-states", action="store_true",
                   help="mode score of a frozen-LM ranker: rank on the LM states an earlier ranker on the same "
                        "LM stored for the same prompts, and store those read now (the rows and seeds of an "
                        "ablation pay the LM once; TPQ then times the stored read)")


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, metavar="N", help="trials in the study (sets tune.num_samples)")
    parser.add_argument("--max-concurrent", type=int, metavar="M",
                        help="trials running at once (sets tune.max_concurrent)")
    parser.add_argument("--output-dir", help="study directory (default: train.output_dir/tune.name)")
    parser.add_argument("--stop-after-trials", type=int, metavar="K",
                        help="end this session once K trials have ended; rerun the command to resume")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alro", description="ALRO list-wise LLM ranker on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw interaction logs -> tokenized ALRO samples (Ray Data)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (train/, valid/, test/, stats.json)")
    p.set_defaults(func=commands.cmd_prepare)

    p = sub.add_parser("train", help="LoRA fine-tuning with the ALRO objective (Ray Train + DeepSpeed)")
    add_config_args(p)
    p.add_argument("--output-dir", help="run directory (default: train.output_dir/train.run_name)")
    p.add_argument("--override-resume", dest="short_train.override_resume", action="store_const", const="true",
                   help="resume even where this config's settings differ from the checkpoint's, applying them "
                        "(sets train.override_resume; the history records the changes)")
    p.add_argument("--no-test-summary", action="store_true",
                   help="skip scoring the final ranker and baselines on the test split")
    p.set_defaults(func=commands.cmd_train)

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
    p.add_argument("--cpus-per-actor", type=int, default=1,
                   help="CPUs each actor reserves, hence its torch threads (CPU ranking: up to the machine's cores)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--seed", type=int, default=0, help="seeds bootstrap orders and random baselines")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--few-shot", type=int, default=0, help="prepend k training samples to every prompt")
    add_reorders_arg(p)
    add_fusion_args(p)
    p.add_argument("--save-fusion", action="store_true",
                   help="with --fuse: save the chosen weights in the checkpoint (fusion.json), Serve's "
                        "default when a request's fusion names no weight")
    p.add_argument("--mlflow", dest="short_tracking.mlflow", metavar="URI", help="log an MLflow run (sets tracking.mlflow)")
    p.add_argument("overrides", nargs="*", metavar="tracking.key=value", help="tracking settings (docs/tracking.md)")
    p.set_defaults(func=commands.cmd_evaluate, config_sections=("tracking",))

    p = sub.add_parser("compare", help="baselines and the LLM ladder on the same test lists (paper Tables 2, 4)")
    add_config_args(p)
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
                   help="train every trained row once per train.seed: the rows of the config's own "
                        "train.seed keep their names, the others' get -seed<s> (so seeds trained in separate "
                        "runs merge); the table adds each recipe's mean over its seeds")
    p.add_argument("--results", metavar="DIR", help="copy the configs, compare.json/md, details.json and "
                                                   "predictions.parquet to DIR (e.g. docs/results/ml100k)")
    add_reorders_arg(p)
    add_fusion_args(p)
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser("claims", help="ALRO's claims (ablation, bootstrap, stability) from an alro compare output "
                                      "with --seeds and --reorders (docs/method.md)")
    p.add_argument("--compare", required=True, metavar="DIR", help="the alro compare output directory")
    p.add_argument("--path", required=True, help="what the ladder ran on, e.g. 'score head, ML-100K rated'")
    p.add_argument("--alro", required=True, metavar="VARIANT", help="the compare variant with both terms")
    for role, what, claims in (("sft", "neither term", "alro-vs-sft"), ("wo-sll", "the permutation term only", "sll"),
                               ("wo-psl", "the list-wise loss only", "psl, psl-vs-bootstrap, stability")):
        p.add_argument(f"--{role}", metavar="VARIANT",
                       help=f"the compare variant with {what} (left out: no {claims} claim; a ladder still running)")
    p.add_argument("--seeds", default="0,1,2", help="the seeds the compare ran (its --seeds)")
    p.add_argument("--mode", default="score", help="the ranking mode of the variants' rows")
    p.add_argument("--bootstrap", type=int, default=5, metavar="K",
                   help="bootstrap@K of the w/o-PSL model from its reorders (needs --reorders >= K - 1)")
    p.add_argument("--out", metavar="FILE", help="claims.json to write (default: DIR/claims.json; other paths' "
                                                 "records in it stay), claims.md beside")
    p.set_defaults(func=commands.cmd_claims)

    p = sub.add_parser("serve", help="serve trained rankers over HTTP (Ray Serve); see docs/serving.md")
    p.add_argument("--checkpoint", help="a ranker directory, served as adapter 'default'")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="another adapter (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, help="dynamic batching: most requests per batch")
    p.add_argument("--batch-wait-timeout-s", type=float, help="dynamic batching: longest wait for a batch")
    p.add_argument("--num-replicas", type=int)
    p.add_argument("--max-queued-requests", type=int,
                   help="requests queued per caller beyond those the ranker works on; past it: 503 with "
                        "Retry-After (default 4 x max batch size)")
    p.add_argument("--request-timeout-s", type=float, help="a request not answered in this time gets 504 "
                                                           "(default 120)")
    p.add_argument("--app-name", default="alro", help="the Serve application's name (another one to serve "
                                                      "beside an app that runs)")
    p.add_argument("--route-prefix", default="/", help="its route, e.g. /movies beside an app at /")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other serve setting (docs/serving.md), e.g. --set num_cpus=0.5 (repeatable)")
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("cache", help="what the model cache holds; --clear-states frees the frozen LM's stored states")
    p.add_argument("--cache-dir", help="the cache (default: $ALRO_CACHE, else ~/.cache/alro-ray)")
    p.add_argument("--clear-states", action="store_true",
                   help="delete the stored frozen-LM states (train.reuse_frozen_states; read again when needed)")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                   help="with --clear-states: only those not written or read back for DAYS days")
    p.set_defaults(func=commands.cmd_cache)

    p = sub.add_parser("tune", help="search α, β, γ: Ray Tune + Optuna TPE + ASHA, each trial a Train run")
    add_config_args(p)
    add_tune_args(p)
    p.set_defaults(func=commands.cmd_tune)
    return parser
