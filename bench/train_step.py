"""Training-step cost of the ALRO objective's variants on the same batch, as ratios to plain SFT.

    python bench/train_step.py [--model smollm2-135m] [--history 10 --candidates 10] [--repeats 3]

One process, no Ray: forward + backward (LoRA) of each variant on the same samples. Every variant
is warmed up first, then the variants are timed in interleaved rounds (this machine is noisy) and
the best round counts. Also measures this machine's fp32 matrix-multiply rate and reports the
share of it each step reaches. FLOPs are estimated as 4 x N x tokens with N the parameters that
multiply (embeddings are lookups): forward 2 N T, backward to the activations 2 N T (frozen
weights need no weight gradient); the LM head runs on the response tail only and is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from alro_ray.config import load_config  # noqa: E402
from alro_ray.model.loading import add_lora, load_base_model  # noqa: E402
from alro_ray.train.objective import collate, compute_losses  # noqa: E402
from alro_ray.data.prepare import SAMPLE_SCHEMA, RenderTokenize, item_table  # noqa: E402
from alro_ray.data.samples import user_samples  # noqa: E402
from alro_ray.data.synthetic import generate  # noqa: E402


def matmul_gflops(n: int = 1024, repeats: int = 10, rounds: int = 3) -> float:
    """Best of a few rounds of n x n fp32 matrix multiplies."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best / 1e9


def sample_rows(cfg, n: int) -> dict:
    source = generate(cfg.data.synthetic)
    items, _ = item_table(source, cfg)
    rows = []
    df = source.interactions.sort_values(["user", "timestamp", "item"])
    for user, g in df.groupby("user"):
        rows += user_samples(user, g["item"].tolist(), g["rating"].tolist(), g["timestamp"].tolist(),
                             split="train", history=cfg.data.history, candidates=cfg.data.candidates,
                             windows=1, permutations=1, seed=0)
        if len(rows) >= n:
            break
    render = RenderTokenize(cfg.model.name, None, cfg.data.candidates, items, source.attribute_name,
                            source.domain_plural)
    return render(pa.Table.from_pylist(rows[:n], schema=SAMPLE_SCHEMA)).to_pydict(), render.tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2, help="micro-batches timed per variant")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config(None, [f"model.name={args.model}", f"data.history={args.history}",
                             f"data.candidates={args.candidates}", "data.synthetic.min_interactions=40",
                             "model.lora.dropout=0.0"])
    rows, tok = sample_rows(cfg, args.samples)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model), cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.get_input_embeddings().weight.numel()
    ident = torch.tensor(tok.identifier_ids)
    variants = {
        "SFT": (dataclasses.replace(cfg.loss, alpha=0.0, beta=0.0), True),
        "SFT + soft lambda": (dataclasses.replace(cfg.loss, beta=0.0), True),
        "ALRO, two full passes": (cfg.loss, False),
        "ALRO, shared prefix": (cfg.loss, True),
    }

    def step(loss_cfg, shared: bool, i: int) -> int:
        batch = collate({k: v[i:i + 1] for k, v in rows.items()}, 0 if loss_cfg.beta > 0 else None)
        terms = compute_losses(model, batch, ident, loss_cfg, tok.tokenizer.pad_token_id, len(tok.header_ids),
                               shared_prefix=shared)
        terms.total.backward()
        model.zero_grad(set_to_none=True)
        computed = len(batch.input_ids[0])
        if loss_cfg.beta > 0:  # tokens the permuted pass actually runs
            computed += len(batch.perm_input_ids[0]) - (batch.prefix_len[0] if shared else 0)
        return computed

    for loss_cfg, shared in variants.values():  # warm-up: first backward, allocator, lazy imports
        step(loss_cfg, shared, 0)
    peak = matmul_gflops()
    best = {name: float("inf") for name in variants}
    tokens = {}
    for _ in range(args.repeats):
        for name, (loss_cfg, shared) in variants.items():
            t0 = time.perf_counter()
            tokens[name] = sum(step(loss_cfg, shared, i) for i in range(args.samples))
            best[name] = min(best[name], time.perf_counter() - t0)
    results = {name: (best[name] / args.samples, tokens[name] / best[name]) for name in variants}

    prompt_tokens = sum(len(x) for x in rows["input_ids"]) / args.samples
    print(f"model {args.model} ({n_params / 1e6:.0f}M params), H={args.history} C={args.candidates}, "
          f"{prompt_tokens:.0f} tokens per sample, {torch.get_num_threads()} threads, "
          f"matmul peak {peak:.0f} GFLOP/s")
    print("| variant | s / sample | tokens/s | ratio to SFT | share of matmul peak |")
    print("| --- | --- | --- | --- | --- |")
    base = results["SFT"][0]
    for name, (sec, tps) in results.items():
        share = 4 * n_matmul * tps / 1e9 / peak
        print(f"| {name} | {sec:.2f} | {tps:.0f} | {sec / base:.2f} | {share:.0%} |")


if __name__ == "__main__":
    main()
