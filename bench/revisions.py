"""A whole training run at two code revisions, side by side: the work tree against a git revision.

    python bench/revisions.py --base REV [--rounds 2] [--config configs/tiny.yaml] [key=value ...]

Trains the same config (`alro train --no-test-summary`, a real local Ray per run) at `--base`
(checked out with `git archive` into a temporary directory) and at the work tree, alternating
(base, work, base, work, ...) so a slow spell of this machine hits both. Prints each run's
tokens/s and seconds per epoch, the median ratio work/base, and whether each side's runs
repeat one another (per-epoch training losses equal). Measures what a change to the training
loop or its data feed costs as a user sees it, ingest and collation included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(into)], input=archive, check=True)
    return into


def train(code: Path, out: Path, config: str, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "alro_ray.cli", "train", "--config", str(ROOT / config), "--output-dir", str(out),
           "--no-test-summary", *overrides]
    log = out.with_suffix(".log")
    with open(log, "w") as f:  # `python -m` puts the current directory first on the path: run in `code`
        done = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:  # the log goes with the temporary directory: show its end now
        tail = "\n".join(log.read_text().splitlines()[-30:])
        sys.exit(f"{tail}\ntraining at {code} failed (rc {done.returncode})")
    return json.loads((out / "history.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare the work tree against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", default=["train.epochs=3", "data.synthetic.users=240"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="alro-bench-rev-") as tmp:
        (Path(tmp) / "base").mkdir()
        sides = {"base": checkout(args.base, Path(tmp) / "base"), "work": ROOT}
        runs: dict[str, list[list[dict]]] = {"base": [], "work": []}
        for r in range(args.rounds):
            for side, code in sides.items():
                runs[side].append(train(code, Path(tmp) / f"{side}-{r}", args.config, args.overrides))
    print(f"config {args.config} {' '.join(args.overrides)}; base {args.base}, work = the work tree")
    print("| side | round | tokens/s per epoch | seconds per epoch | training loss per epoch |")
    print("| --- | --- | --- | --- | --- |")
    for side in sides:
        for r, h in enumerate(runs[side]):
            cells = [" ".join(f"{e[key]:{fmt}}" for e in h)
                     for key, fmt in (("tokens_per_s", ".0f"), ("train_seconds", ".1f"), ("train_loss", ".4f"))]
            print(f"| {side} | {r + 1} | {' | '.join(cells)} |")
    speed = {side: statistics.median(e["tokens_per_s"] for h in runs[side] for e in h) for side in sides}
    print(f"\nmedian tokens/s: base {speed['base']:.0f}, work {speed['work']:.0f}, work/base {speed['work'] / speed['base']:.2f}")
    for side in sides:
        losses = [[e["train_loss"] for e in h] for h in runs[side]]
        print(f"{side}: the {len(losses)} runs' losses {'repeat exactly' if all(x == losses[0] for x in losses) else 'differ'}")


if __name__ == "__main__":
    main()
