"""Cost per sample as the lists grow: seconds and peak memory of the train step (SFT, ALRO, the
score head) and of one-pass ranking at several (H, C), in one process, as ratios to the smallest.

    python bench/growth.py [--grid 10x10,20x10,10x25,20x25] [--steps 1] [--rounds 2] [--json FILE]
                           [--model smollm2-135m] [KEY=VALUE ...]

No Ray: the work of one sample, as bench/train_step.py times it (its `sample_rows` builds the
samples from the synthetic data). Variants:

  sft       forward + backward, SFT loss (alpha = beta = 0), LoRA on q,k,v,o of every layer
  alro      forward + backward, ALRO (soft lambda + the permuted prompt over the shared prefix)
  score     forward + backward, the score head's lambda loss (loss.objective: score)
  one_pass  no-grad forward of the prompt up to the response header: the letters' logits rank
            the candidates (rank/decoding.py's one-pass mode)

Every (setting, variant) runs in every round, interleaved (this machine is noisy); the best round
counts. Peak memory (of the cell's `--steps` samples, one at a time) is what a step adds to the process's resident set: the kernel's high-water
mark is reset before the step (/proc/self/clear_refs, after glibc's malloc_trim has handed freed
heap back), and the step's peak is read back less the resident set before it (Linux with glibc
only; blank elsewhere). It covers activations, gradients and the
allocator's growth, not the model's weights, which are loaded once before.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from train_step import sample_rows  # noqa: E402

from alro_ray.config import HeadConfig, load_config  # noqa: E402
from alro_ray.model.loading import add_lora, load_base_model  # noqa: E402
from alro_ray.model.score_head import attach_head, scorer_of  # noqa: E402
from alro_ray.train.objective import collate, compute_losses  # noqa: E402

VARIANTS = ("sft", "alro", "score", "one_pass")


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Give freed heap back to the system (glibc keeps it resident, and a step would then show no
    growth after a larger one), then reset the high-water mark to the resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grid", default="10x10,20x10,10x25,20x25", help="HxC settings; the first is the reference")
    ap.add_argument("--steps", type=int, default=1, help="samples per variant, setting and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds after a warm-up; the best counts")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.lora.rank=8")
    args = ap.parse_args()
    grid = [tuple(int(x) for x in s.split("x")) for s in args.grid.split(",")]

    base = load_config(None, [f"model.name={args.model}", "model.lora.dropout=0.0", *args.overrides])
    torch.manual_seed(0)
    lora = add_lora(load_base_model(base.model), base.model)
    score_model_cfg = dataclasses.replace(base.model, head=HeadConfig(kind="linear"))
    torch.manual_seed(0)
    scored = add_lora(load_base_model(score_model_cfg), score_model_cfg)
    attach_head(scored, score_model_cfg)

    settings = {}
    for h, c in grid:
        cfg = load_config(None, [f"model.name={args.model}", f"data.history={h}", f"data.candidates={c}",
                                 f"data.synthetic.min_interactions={h + c + 5}",
                                 f"data.synthetic.max_interactions={h + c + 40}", *args.overrides])
        rows, tok = sample_rows(cfg, args.steps)
        settings[(h, c)] = (cfg, rows, tok)

    def run(variant: str, key: tuple[int, int]) -> None:
        cfg, rows, tok = settings[key]
        ident, pad = torch.tensor(tok.identifier_ids), tok.tokenizer.pad_token_id
        for i in range(args.steps):
            part = {k: v[i:i + 1] for k, v in rows.items()}
            if variant == "one_pass":
                prompt = torch.tensor([rows["input_ids"][i][:rows["slot_positions"][i][0]]])
                with torch.no_grad():
                    lora(input_ids=prompt, logits_to_keep=1).logits[0, -1, ident].argsort(descending=True)
                continue
            model = scored if variant == "score" else lora
            loss = {"sft": dataclasses.replace(cfg.loss, alpha=0.0, beta=0.0), "alro": cfg.loss,
                    "score": dataclasses.replace(cfg.loss, objective="score", alpha=1.0, beta=0.0)}[variant]
            batch = collate(part, 0 if loss.beta > 0 else None)
            terms = compute_losses(model, batch, ident, loss, pad, len(tok.header_ids), shared_prefix=True,
                                   scorer=scorer_of(model, tok))
            terms.total.backward()
            model.zero_grad(set_to_none=True)

    for v in VARIANTS:  # warm-up: first backward, allocator, lazy imports
        run(v, grid[0])
    best = {(k, v): float("inf") for k in settings for v in VARIANTS}
    peak = {(k, v): 0.0 for k in settings for v in VARIANTS}
    measured_peak = True
    for r in range(args.rounds):
        for key in settings:
            for v in VARIANTS:
                measured_peak = reset_peak() and measured_peak
                before = _status_kib("VmRSS") or 0
                t0 = time.perf_counter()
                run(v, key)
                best[(key, v)] = min(best[(key, v)], time.perf_counter() - t0)
                hwm = _status_kib("VmHWM")
                if measured_peak and hwm is not None:
                    peak[(key, v)] = max(peak[(key, v)], (hwm - before) / 1024)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    ref = grid[0]
    tokens = {k: sum(len(x) for x in rows["input_ids"]) / args.steps for k, (_, rows, _) in settings.items()}
    figures = []
    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.steps} sample(s) per cell, "
          f"best of {args.rounds} interleaved rounds; ratios to H={ref[0]} C={ref[1]}")
    print("| H | C | tokens / sample (ratio) | " + " | ".join(f"{v}: s / sample (ratio)" for v in VARIANTS)
          + " | " + " | ".join(f"{v}: peak MiB" for v in VARIANTS) + " |")
    print("| --- " * (3 + 2 * len(VARIANTS)) + "|")
    for key in settings:
        row = {"history": key[0], "candidates": key[1], "tokens_per_sample": tokens[key],
               "token_ratio": tokens[key] / tokens[ref]}
        times, mems = [], []
        for v in VARIANTS:
            s = best[(key, v)] / args.steps
            ratio = best[(key, v)] / best[(ref, v)]
            mib = peak[(key, v)] if measured_peak else None
            row[v] = {"s_per_sample": s, "time_ratio": ratio, "peak_mib": mib}
            times.append(f"{s:.3f} ({ratio:.2f}x)")
            mems.append(f"{mib:.0f}" if mib is not None else "-")
        figures.append(row)
        print(f"| {key[0]} | {key[1]} | {tokens[key]:.0f} ({row['token_ratio']:.2f}x) | " + " | ".join(times + mems) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": args.model,
                                               "threads": torch.get_num_threads(), "steps": args.steps,
                                               "rounds": args.rounds, "settings": figures}, indent=2))


if __name__ == "__main__":
    main()
