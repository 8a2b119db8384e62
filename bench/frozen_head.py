"""Fitting the score head on a frozen LM: recomputing its states every step against reading them
once (train/frozen.py), as ratios on the same samples.

    python bench/frozen_head.py [--layer -18] [--samples 4] [--history 10 --candidates 10] [--model smollm2-135m]

One process, no Ray, the model as `model.freeze_lm` trains it (LoRA at its no-op init, frozen; a
linear head with the user match). Timed per sample, best of interleaved rounds (this machine is
noisy):

  recompute      a score-objective step (train.cache_frozen_states: false): the LM's forward over
                 the training row, then backward into the head only
  read_full      reading the states with a forward through every layer (output_hidden_states)
  read_to_layer  reading them as the cached path does: a forward that stops at the head's layer
  cached_step    a head step on cached states (forward and backward of the head alone)

and, from those, the cost of E epochs per sample: recompute E x recompute against
read_to_layer + E x cached_step. Last, reading all the samples' states as a training worker does
(`frozen.read_states`) with nothing stored against reading them back from the store that first
read wrote (train.reuse_frozen_states: the key over the weights and prompts, then the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from alro_ray.config import HeadConfig, load_config  # noqa: E402
from alro_ray.model.loading import add_lora, load_base_model  # noqa: E402
from alro_ray.model.hidden import hidden_states_at  # noqa: E402
from alro_ray.model.padding import left_pad, positions  # noqa: E402
from alro_ray.model.score_head import attach_head, head_of, scorer_of  # noqa: E402
from alro_ray.rank.evaluation import prompt_ids  # noqa: E402
from alro_ray.train import frozen  # noqa: E402
from alro_ray.train.objective import collate, compute_losses  # noqa: E402
from bench.train_step import sample_rows  # noqa: E402

EPOCHS = (1, 10, 40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=-18, help="the head's layer (model.head.layer)")
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--samples", type=int, default=4, help="samples timed per variant and round, one at a time")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    args = ap.parse_args()

    cfg = load_config(None, [f"model.name={args.model}", f"data.history={args.history}",
                             f"data.candidates={args.candidates}", "data.synthetic.min_interactions=40",
                             "model.lora.dropout=0.0"])
    model_cfg = dataclasses.replace(cfg.model, freeze_lm=True, head=HeadConfig(
        kind="linear", layer=args.layer, user="rated_history"))
    loss = dataclasses.replace(cfg.loss, objective="score", alpha=1.0, beta=0.0)
    rows, tok = sample_rows(cfg, args.samples)
    torch.manual_seed(0)
    model = add_lora(load_base_model(model_cfg), model_cfg)
    attach_head(model, model_cfg)
    scorer, pad = scorer_of(model, tok), tok.tokenizer.pad_token_id
    records = [dict(zip(rows, values), user=str(i)) for i, values in enumerate(zip(*rows.values()))]
    cached = frozen.CachedStates.extract(model, scorer, records, pad)
    ident = torch.tensor(tok.identifier_ids)

    def one(name: str, i: int) -> None:
        if name == "recompute":
            batch = collate({k: v[i:i + 1] for k, v in rows.items()}, None)
            compute_losses(model, batch, ident, loss, pad, len(tok.header_ids), scorer=scorer).total.backward()
        elif name == "cached_step":
            frozen.losses(head_of(model), cached.batch([i]), loss).total.backward()
        else:
            ids, mask = left_pad([prompt_ids(records[i])], pad, "cpu")
            with torch.no_grad():
                if name == "read_full":
                    model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                          logits_to_keep=1, output_hidden_states=True)
                else:
                    hidden_states_at(model, args.layer, ids, mask)
        model.zero_grad(set_to_none=True)

    names = ("recompute", "read_full", "read_to_layer", "cached_step")
    for name in names:  # warm-up
        one(name, 0)
    best = {name: float("inf") for name in names}
    for _ in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            for i in range(args.samples):
                one(name, i)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.samples)

    layers = model.get_base_model().config.num_hidden_layers
    tokens = sum(len(prompt_ids(r)) for r in records) / len(records)
    print(f"\n{args.model}, head layer {args.layer} ({layers} layers), {tokens:.0f} prompt tokens per sample, "
          f"{torch.get_num_threads()} threads; seconds per sample, best of {args.repeats} rounds\n")
    print("| variant | s per sample | ratio to recompute |\n| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {best[name]:.4f} | {best[name] / best['recompute']:.4f} |")
    print("\n| epochs | recompute s per sample | cached s per sample | ratio |\n| --- | --- | --- | --- |")
    for e in EPOCHS:
        a, b = e * best["recompute"], best["read_to_layer"] + e * best["cached_step"]
        print(f"| {e} | {a:.2f} | {b:.2f} | {b / a:.3f} |")

    store = Path(tempfile.mkdtemp(prefix="frozen-states-"))
    read = {"read_states": float("inf"), "read_back": float("inf")}
    for _ in range(args.repeats):
        for name in read:
            if name == "read_states":
                shutil.rmtree(store, ignore_errors=True)
            t0 = time.perf_counter()
            frozen.read_states(model, tok, records, pad, 0, lambda _: None, "train", store)
            read[name] = min(read[name], time.perf_counter() - t0)
    t0 = time.perf_counter()
    frozen.states_key(model, scorer, records, pad, frozen.READ_BATCH)
    key_s = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    print(f"\n| reading {len(records)} samples' states | s | ratio to read_states |\n| --- | --- | --- |")
    for name, s in read.items():
        print(f"| {name} | {s:.3f} | {s / read['read_states']:.4f} |")
    print(f"(of which the key: {key_s:.3f} s, most of it hashing the weights once)")


if __name__ == "__main__":
    main()
