"""`alro` command line: thin wrappers over the library; jobs/*.py call the same functions.

Every command takes `--config FILE.yaml` and config overrides, either as `section.key=value`
or `--section.key value`; the common ones also have short flags (`--history 10`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from alro_ray.config import Config, load_config
from alro_ray.errors import AlroError

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
    return load_config(args.config, _collect_overrides(args, extra))


def cmd_prepare(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.prepare import prepare

    stats = prepare(cfg, args.out)
    summary = {k: stats[k] for k in ("users_read", "users_kept", "users_dropped", "rows",
                                      "mean_prompt_tokens", "interactions_read", "interactions_dropped")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'stats.json'}")
    return 0


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from alro_ray.training import run_training

    outcome = run_training(cfg, args.output_dir)
    last = outcome.history[-1] if outcome.history else {}
    print(json.dumps({k: v for k, v in last.items() if k.startswith(("valid_", "train_"))}, indent=2))
    print(f"final ranker: {outcome.final_dir}")
    return 0


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
    p.set_defaults(func=cmd_train)
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


if __name__ == "__main__":
    sys.exit(main())
