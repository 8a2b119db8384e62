"""Training-step cost of the objective's variants on the same batch, as ratios to plain SFT.

    python bench/train_step.py [--quick] [--compile] [--json FILE] [--device cpu|cuda] [--micro-batch N]
                               [--model smollm2-135m] [--history 10 --candidates 10] [KEY=VALUE ...]

One process, no Ray: forward + backward of each variant on the same samples. Every variant is
warmed up first, then the variants are timed in interleaved rounds (this machine is noisy) and the
best round counts. Variants (keys of the JSON):

  sft              SFT (alpha = beta = 0), LoRA on q,k,v,o of every layer: the reference
  sft_lambda       SFT + the soft lambda loss (beta = 0)
  alro_two_passes  ALRO with the permuted prompt run as a second full sequence
  alro             ALRO with the shared history prefix (train.shared_prefix, the default)
  alro_rate50      ALRO with loss.permutation_rate 0.5: the permuted pass on half the steps;
                   derived, not timed: the mean of alro and sft_lambda (a step without it)
  sft_top4         SFT with LoRA on the top 4 decoder layers only (model.lora.layers: 4)
  sft_top4_lower   the same from the states below those layers, read back (train.cache_lower_layers,
                   train/lower_states.py): the top 4 layers' forward and backward; the warm-up and
                   the first round read the states (a best round is a read-back one)
  alro_top4        ALRO (shared prefix) with LoRA on the top 4 layers
  alro_top4_lower  the same from the states read back (both prompts through the top 4 layers)
  score            the score head (loss.objective: score, lambda loss on a linear head, beta = 0)
  score_mid_top4   the same head on layer -24 (configs/ml100k_topn_score.yaml's) with LoRA on the
                   4 layers below it (model.lora.layers: 4): the forward stops at the head's layer
  sft_compiled     with --compile: SFT on a copy of the model compiled in place (train.compile);
                   its compile time (the warm-up step) is reported apart

Collation (`train.objective.collate`, run in Ray Data's prefetch thread by the trainer) is timed
apart from the steps and reported per micro-batch, and so is the weight average's update over the
sft variant's LoRA weights (`train.ema_decay`, train/averaging.py), once per optimizer step.

--quick times the variants in QUICK only (the two-pass and the rate-50 ALRO left out), 3 rounds.
The device's matrix-multiply rate (fp32 on CPU, bf16 on CUDA, where the model runs in bf16 as
under DeepSpeed) is measured too, and each step's share of it reported. FLOPs are estimated as
4 x N x tokens with N the parameters that multiply (embeddings are lookups): forward 2 N T,
backward to the activations 2 N T (frozen weights need no weight gradient); the LM head runs on
the response tail only and is left out. Tokens per second count each sample's own tokens once
(the permuted prompt of ALRO is cost, not throughput). For sft_top4 that estimate overstates the work (backward
stops at the lowest LoRA layer; the _lower variants' forward starts there), and for score_mid_top4 (the forward stops at the head), so their
shares of peak read as equivalents against full SFT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from alro_ray.config import HeadConfig, load_config  # noqa: E402
from alro_ray.data.dataset import SAMPLE_SCHEMA  # noqa: E402
from alro_ray.data.prepare import RenderTokenize, item_table  # noqa: E402
from alro_ray.data.samples import user_samples  # noqa: E402
from alro_ray.data.synthetic import generate  # noqa: E402
from alro_ray.model.loading import add_lora, load_base_model  # noqa: E402
from alro_ray.model.score_head import attach_head, scorer_of  # noqa: E402
from alro_ray.errors import ConfigError  # noqa: E402
from alro_ray.train.averaging import WeightAverage  # noqa: E402
from alro_ray.train.lower_states import LowerStates, lowest_lora_layer  # noqa: E402
from alro_ray.train.objective import collate, compute_losses  # noqa: E402

QUICK = ("sft", "sft_lambda", "alro", "sft_top4", "sft_top4_lower", "alro_top4", "alro_top4_lower", "score",
         "score_mid_top4")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(device: str, dtype, repeats: int = 10, rounds: int = 3) -> float:
    """Best of a few rounds of n x n matrix multiplies (n = 1024 on CPU, 8192 on a GPU)."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best / 1e9


def sample_rows(cfg, n: int) -> tuple[dict, object]:
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
    if len(rows) < n:
        raise SystemExit(f"the synthetic data gives {len(rows)} samples, fewer than the {n} needed")
    render = RenderTokenize(cfg.model.name, None, cfg.data.candidates, items, source.attribute_name,
                            source.domain_plural)
    return render(pa.Table.from_pylist(rows[:n], schema=SAMPLE_SCHEMA)).to_pydict(), render.tok


def build_variants(cfg, device: str, dtype, compiled: bool = False) -> dict:
    """name -> (model, loss config, shared_prefix, the states below LoRA (LowerStates) or None)."""
    def lora_model(model_cfg, head_only=False):
        torch.manual_seed(0)
        return add_lora(load_base_model(model_cfg, dtype), model_cfg, head_only).to(device)

    full = lora_model(cfg.model)
    top4 = lora_model(dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, layers=4)))
    score_cfg = dataclasses.replace(cfg.model, head=HeadConfig(kind="linear"))
    scored = lora_model(score_cfg)
    attach_head(scored, score_cfg)
    mid_cfg = dataclasses.replace(cfg.model, head=HeadConfig(kind="linear", layer=-24),
                                  lora=dataclasses.replace(cfg.model.lora, layers=4))
    try:
        mid = lora_model(mid_cfg, head_only=True)
        attach_head(mid, mid_cfg)
    except ConfigError as e:  # a model without 24 layers (tiny-random)
        print(f"score_mid_top4 left out: {e}")
        mid = None
    sft = dataclasses.replace(cfg.loss, alpha=0.0, beta=0.0)
    extra = {}
    if compiled:
        model = lora_model(cfg.model)
        model.compile(dynamic=True)
        extra["sft_compiled"] = (model, sft, True)
    score = dataclasses.replace(cfg.loss, objective="score", alpha=1.0, beta=0.0)
    variants = {
        "sft": (full, sft, True),
        "sft_lambda": (full, dataclasses.replace(cfg.loss, beta=0.0), True),
        "alro_two_passes": (full, cfg.loss, False),
        "alro": (full, cfg.loss, True),
        "sft_top4": (top4, sft, True),
        "sft_top4_lower": (top4, sft, True, LowerStates(lowest_lora_layer(top4))),
        "alro_top4": (top4, cfg.loss, True),
        "alro_top4_lower": (top4, cfg.loss, True, LowerStates(lowest_lora_layer(top4))),
        "score": (scored, score, True),
        **({} if mid is None else {"score_mid_top4": (mid, score, True)}),
        **extra,
    }
    return {name: v if len(v) == 4 else (*v, None) for name, v in variants.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the model in bf16, as DeepSpeed runs it)")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per step")
    ap.add_argument("--steps", type=int, default=2, help="steps timed per variant and round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    ap.add_argument("--quick", action="store_true", help=f"variants {', '.join(QUICK)} only, 3 rounds")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--compile", action="store_true", help="add sft_compiled (minutes of compiling on a CPU)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.lora.rank=8")
    args = ap.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 3)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.set_num_threads(torch.get_num_threads())  # the default: every core

    cfg = load_config(None, [f"model.name={args.model}", f"data.history={args.history}",
                             f"data.candidates={args.candidates}", "data.synthetic.min_interactions=40",
                             "model.lora.dropout=0.0", *args.overrides])
    n = args.steps * args.micro_batch
    rows, tok = sample_rows(cfg, n)
    variants = build_variants(cfg, args.device, dtype, args.compile)
    if args.quick:
        variants = {k: v for k, v in variants.items() if k in QUICK or k == "sft_compiled"}
    full = variants["sft"][0]
    n_params = sum(p.numel() for p in full.parameters())
    n_matmul = n_params - full.get_input_embeddings().weight.numel()
    ident = torch.tensor(tok.identifier_ids)
    pad = tok.tokenizer.pad_token_id

    collate_s = []

    def step(name: str, i: int) -> None:
        model, loss_cfg, shared, lower = variants[name]
        part = {k: v[i * args.micro_batch:(i + 1) * args.micro_batch] for k, v in rows.items()}
        t0 = time.perf_counter()
        batch = collate(part, 0 if loss_cfg.beta > 0 else None)
        collate_s.append(time.perf_counter() - t0)
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            terms = compute_losses(model, batch, ident, loss_cfg, pad, len(tok.header_ids), shared_prefix=shared,
                                   scorer=scorer_of(model, tok), lower=lower)
        terms.total.backward()
        model.zero_grad(set_to_none=True)

    warmup = {}
    for name in variants:  # warm-up: first backward, allocator, lazy imports (and compiling)
        t0 = time.perf_counter()
        step(name, 0)
        warmup[name] = time.perf_counter() - t0
    peak = matmul_gflops(args.device, dtype)
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            sync(args.device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(name, i)
            sync(args.device)
            best[name] = min(best[name], time.perf_counter() - t0)

    trained = [p for p in full.parameters() if p.requires_grad]
    average, ema_s = WeightAverage(trained, 0.99), []
    for _ in range(20):
        sync(args.device)
        t0 = time.perf_counter()
        average.update()
        sync(args.device)
        ema_s.append(time.perf_counter() - t0)
    ema_ms = 1000 * sorted(ema_s)[len(ema_s) // 2]

    sft_s = best["sft"] / n
    tokens = sum(len(x) for x in rows["input_ids"])
    figures = {}
    for name in variants:
        s_per_sample = best[name] / n
        tps = tokens / best[name]  # the samples' own tokens: a permuted pass is cost, not throughput
        figures[name] = {"s_per_sample": s_per_sample, "tokens_per_s": tps,
                         "share_of_peak": 4 * n_matmul * tps / 1e9 / peak, "ratio_to_sft": s_per_sample / sft_s}
    if "sft_lambda" in figures:
        rate50 = (figures["alro"]["s_per_sample"] + figures["sft_lambda"]["s_per_sample"]) / 2
        figures["alro_rate50"] = {"s_per_sample": rate50, "tokens_per_s": tokens / n / rate50,
                                  "share_of_peak": 4 * n_matmul * tokens / n / rate50 / 1e9 / peak,
                                  "ratio_to_sft": rate50 / sft_s, "derived": "mean of alro and sft_lambda"}
    if "sft_compiled" in figures:
        figures["sft_compiled"]["compile_s"] = warmup["sft_compiled"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    prompt_tokens = tokens / n
    head = (f"model {args.model} ({n_params / 1e6:.0f}M params), H={args.history} C={args.candidates}, "
            f"{prompt_tokens:.0f} tokens per sample, micro-batch {args.micro_batch}, {args.device} ({device_name}, "
            f"{torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')} matmul peak {peak:.0f} GFLOP/s")
    collate_ms = 1000 * sorted(collate_s)[len(collate_s) // 2]
    head += (f"; collate {collate_ms:.2f} ms per micro-batch, weight average {ema_ms:.2f} ms per optimizer step over "
             f"{sum(p.numel() for p in trained) / 1e6:.1f}M LoRA weights (medians)")
    if "sft_compiled" in figures:
        head += f"; compiling took {warmup['sft_compiled']:.0f} s"
    print(head)
    print("| variant | s / sample | prompt tokens/s | ratio to sft | share of matmul peak |")
    print("| --- | --- | --- | --- | --- |")
    for name, f in figures.items():
        print(f"| {name} | {f['s_per_sample']:.3f} | {f['tokens_per_s']:.0f} | {f['ratio_to_sft']:.2f} | "
              f"{f['share_of_peak']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "setting": head, "device": args.device, "micro_batch": args.micro_batch,
            "prompt_tokens": prompt_tokens, "matmul_peak_gflops": peak, "collate_ms": collate_ms,
            "ema_update_ms": ema_ms,
            "variants": figures}, indent=2))


if __name__ == "__main__":
    main()
