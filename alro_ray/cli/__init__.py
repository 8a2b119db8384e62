"""`alro` command line: thin wrappers over the library; jobs/*.py call the same functions.

Every command takes `--config FILE.yaml` and config overrides, either as `section.key=value`
or `--section.key value`; the common ones also have short flags (`--history 10`).
`parser` builds the argument parser, `commands` holds one function per command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alro_ray.cli.parser import make_parser
from alro_ray.config import Config, load_config
from alro_ray.errors import AlroError
from alro_ray.logs import console_logging, log_to_file


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


def log_file(args: argparse.Namespace, cfg: Config) -> Path | None:
    """Where a command's full log goes (logs.py): `alro.log` in its output directory."""
    out = {"prepare": "out", "evaluate": "out", "compare": "output_dir", "train": "output_dir", "tune": "output_dir"}
    if args.command not in out:
        return None
    where = getattr(args, out[args.command], None)
    if where is None and args.command in ("train", "tune"):
        where = Path(cfg.train.output_dir) / (cfg.train.run_name if args.command == "train" else cfg.tune.name)
    return Path(where) / "alro.log" if where else None


def main(argv: list[str] | None = None) -> int:
    console_logging()
    parser = make_parser()
    rest, dotted = _split_dotted(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(rest)
    extra += dotted
    try:
        cfg = build_config(args, extra)
        path = log_file(args, cfg)
        if path is None:
            return args.func(args, cfg)
        with log_to_file(path):
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
