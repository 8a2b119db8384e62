"""Time per query of the ranking modes on the same queries, as ratios to `generate`.

    python bench/inference.py [--model smollm2-135m] [--history 10 --candidates 10] [--queries 8]

One process, no Ray: an (untrained) LoRA ranker on synthetic queries; one-pass, generate, free
and bootstrap@3/@5 at batch sizes 1 and 8, best of --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from alro_ray.config import load_config  # noqa: E402
from alro_ray.rank.ranking import bootstrap_orders, free_batch, rank_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from alro_ray.cluster import ensure_ray
    from alro_ray.evaluate.compare import untrained_ranker
    from alro_ray.rank.ranker import load_ranker
    from alro_ray.rank.evaluation import prompt_ids
    from alro_ray.data.dataset import load_renderer, read_split
    from alro_ray.data.prepare import prepare

    cfg = load_config(None, [f"model.name={args.model}", f"data.history={args.history}",
                             f"data.candidates={args.candidates}", "data.synthetic.users=60",
                             "data.synthetic.min_interactions=40", "data.permutations=0"])
    tmp = Path(tempfile.mkdtemp(prefix="alro-bench-"))
    ensure_ray(num_cpus=2)
    prepare(cfg, tmp / "data")
    ranker = load_ranker(untrained_ranker(cfg, tmp / "data", tmp / "ranker"))
    renderer = load_renderer(tmp / "data")
    rows = read_split(tmp / "data", "train").to_dict("records")[: args.queries]
    prompts = [prompt_ids(r) for r in rows]
    c, pad, ident = ranker.candidates, ranker.tokenizer.pad_token_id, ranker.rank_tokenizer.identifier_ids

    def run(mode: str, batch: int) -> None:
        for s in range(0, len(rows), batch):
            chunk = list(range(s, min(s + batch, len(rows))))
            if mode in ("one-pass", "generate"):
                rank_batch(ranker.model, [prompts[i] for i in chunk], ident, mode, pad)
            elif mode == "free":
                free_batch(ranker.model, [prompts[i] for i in chunk], c, pad, ranker.tokenizer.eos_token_id,
                           ranker.tokenizer)
            else:
                p = int(mode.split("@")[1])

                def prompt_for(j, perm, chunk=chunk):
                    row = rows[chunk[j]]
                    return ranker.rank_tokenizer.prompt_ids(renderer.prefix(row), renderer.suffix(row, perm))[0]

                bootstrap_orders(ranker.model, prompt_for, list(range(len(chunk))), c, p, pad, ident,
                                 batch_size=batch)

    modes = ("generate", "one-pass", "free", "bootstrap@3", "bootstrap@5")
    results = {}
    with torch.no_grad():
        for batch in (1, 8):
            for mode in modes:
                run(mode, batch)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run(mode, batch)
                    best = min(best, time.perf_counter() - t0)
                results[(mode, batch)] = best / len(rows)
    tokens = sum(len(p) for p in prompts) / len(prompts)
    print(f"model {args.model}, H={args.history} C={args.candidates}, {tokens:.0f} prompt tokens, "
          f"{len(rows)} queries, {torch.get_num_threads()} threads")
    print("| mode | batch | TPQ s | ratio to generate (same batch) |")
    print("| --- | --- | --- | --- |")
    for (mode, batch), tpq in results.items():
        print(f"| {mode} | {batch} | {tpq:.3f} | {tpq / results[('generate', batch)]:.2f} |")


if __name__ == "__main__":
    main()
