"""alro-ray against what a user would use instead: the same SFT training and the same ranking, as ratios.

    python bench/peers.py [--quick] [--json FILE] [--steps N] [--grad-accum G] [--rounds R] [--eval-rounds R]
                          [--lists N] [--eval-modes one-pass,score] [--skip-train] [KEY=VALUE ...]

Data: configs/quickstart.yaml's synthetic set (SmolLM2-135M tokenizer, H=5, C=5, ~300-token
prompts), prepared once into a temp dir with 200 users and `data.split` 0.5/0.1/0.4 so the test split has
enough lists to time ranking. A local Ray (alro_ray.cluster.ensure_ray, all the machine's CPUs)
is started once and reused; everything written goes under one tempfile dir.

Training: plain SFT (loss.alpha = loss.beta = 0) of SmolLM2-135M with the config's LoRA (rank 16
on q,k,v,o of every layer), fp32, micro-batch 1, N optimizer steps of the same global batch
(2 x G samples: alro_2w's 2 workers x grad_accum G), the same lr, linear warmup and gradient
clipping at 1.0. Every variant starts from the same LoRA initialisation (seed 0). Tokens/s count
each sample's own tokens (sum of len(input_ids), no padding at micro-batch 1). Variants:

  alro_2w     alro_ray.train.trainer.run_training: Ray Train + DeepSpeed ZeRO-2, 2 workers of 1 CPU
              (the default layout here), train.max_steps_per_epoch N, 1 epoch, validation on
              train.eval_users = 4 valid lists in one-pass mode, a checkpoint and final/ at the end.
              Steady tokens/s: the epoch's `steady_tokens_per_s` (after the first optimizer step,
              all workers together); whole run: run_training's wall time.
  alro_1w     the same with 1 worker of 2 CPUs (Ray sets OMP_NUM_THREADS=2 in it, so torch runs 2
              threads) and grad_accum 2G: the same global batch.
  hf_trainer  transformers.Trainer in this process (2 torch threads, use_cpu, no eval, no saving),
              the same LoRA model, labels = input_ids with the prompt set to -100 exactly where the
              prepared response mask is 0, per-device batch 1, gradient_accumulation_steps 2G,
              max_steps N. Steps are timed with a TrainerCallback, tokens counted by a forward
              pre-hook on the model; steady state = the steps after the first. Whole run: model
              load + Trainer construction + train().
  bare        a plain PyTorch loop in this process (2 threads): the same model, AdamW, micro-batches
              and accumulation, clipping and schedule; loss = model(input_ids, labels=...).loss.

Which loss each computes: alro's objective (train/objective.py compute_losses) runs the LM head on
the response tail only (`logits_to_keep`: the prompt's last token, the header, the C letters, eos)
and takes the token-mean NLL of the response; hf_trainer and bare run the LM head over every
position (SmolLM2's 49k-word vocabulary: ~25% more work than the decoder on these prompts) and
compute the same NLL from labels masked with -100. The gradients are the same; the work is not,
and that difference is part of what is compared.

The training variants run in interleaved rounds (round 1: every variant, round 2: every variant,
...), each from scratch; the best round per variant counts, for steady tokens/s and for whole-run
seconds separately. train_ratio_peer = alro_2w steady tokens/s / hf_trainer's;
train_ratio_bare = alro_2w / bare.

Inference (lists per second on the test split, both sides from a ranker checkpoint):

  alro_eval   alro_ray.evaluate.batch_eval.run_evaluation (`alro evaluate`: Ray Data, one RankActor
              of --cpus-per-actor CPUs (default 2, hence 2 torch threads, as the plain loop),
              batch 8, no baselines), one mode per job. Whole job: its wall time (actor start,
              model load, ranking, metrics, report); ranking: the actor's own per-list seconds.
  plain       a batched loop in this process (2 threads): the checkpoint loaded with PEFT, the same
              prompts (input_ids up to the first identifier), left-padded batches of 8 with position
              ids, one forward each. one-pass: logits at the last position (logits_to_keep=1, as alro)
              for the C identifier letters, log-softmax, argsort. score: the last layer's hidden
              states, gathered at each candidate line's last token, through the checkpoint's head.
              Whole: model load + loop; ranking: the loop. torch, transformers and PEFT are
              already imported here (the training variants, alro's driver), so its whole leaves
              out the imports an alro actor pays in its new process.
  fresh       the plain loop as a user's script runs it: a new Python process (this file with a
              hidden flag) that imports, loads and ranks. Whole: that process's wall time.

one-pass ranks with the alro_2w run's final/ (the last round's); score with an untrained linear
head on the last layer's states (save_ranker of a fresh LoRA model with the head: speed does not
depend on what it learnt). eval_ratio_plain = alro_eval lists/s / plain's for one-pass, whole
job against whole (`eval_ratio_plain_ranking`: ranking only; the `_score` keys for score mode);
eval_ratio_plain_fresh: against the fresh process's whole.

--quick: N = 5 optimizer steps of grad_accum 2 (20 samples per variant), 2 training rounds
without alro_1w (no ratio needs it), 2 evaluation rounds on the first 32 test lists
(`EvalSettings.limit`; the plain loop ranks as many) in one-pass mode only (the score mode's
ratios are the full run's: `--eval-modes one-pass,score` adds them).
Default: N = 10, 3 rounds each, all 80 test lists, both modes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alro_ray.config import HeadConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_VARIANTS = ("alro_2w", "alro_1w", "hf_trainer", "bare")
BATCH = 8  # lists per forward, both sides of the evaluation (EvalSettings' default)


def best_of(runs: list[dict], key: str, high: bool = True) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return max(values) if high else min(values)


# ---------------------------------------------------------------------------------------------
# training


def alro_run(cfg, out: Path, workers: int, grad_accum: int) -> dict:
    from alro_ray.train.trainer import run_training

    t = dataclasses.replace(cfg.train, num_workers=workers, cpus_per_worker=2.0 / workers, grad_accum=grad_accum)
    run_cfg = dataclasses.replace(cfg, train=t)
    t0 = time.perf_counter()
    outcome = run_training(run_cfg, out)
    wall = time.perf_counter() - t0
    h = outcome.history[-1]
    return {"steady_tokens_per_s": h.get("steady_tokens_per_s"), "tokens_per_s": h["tokens_per_s"],
            "train_seconds": h["train_seconds"], "samples": h["train_samples"], "whole_s": wall,
            "final": str(outcome.final_dir)}


def lora_model(cfg):
    from alro_ray.model.loading import add_lora, load_base_model

    torch.manual_seed(cfg.train.seed)
    return add_lora(load_base_model(cfg.model), cfg.model)


def labelled(rows: list[dict]) -> list[dict]:
    """input_ids and labels (-100 where the prepared response mask is 0) as tensors."""
    out = []
    for r in rows:
        ids = torch.tensor([int(x) for x in r["input_ids"]])
        mask = torch.tensor([int(x) for x in r["labels_mask"]], dtype=torch.bool)
        out.append({"input_ids": ids, "labels": torch.where(mask, ids, torch.full_like(ids, -100))})
    return out


def warmup_steps(cfg, steps: int) -> int:
    """train/worker.make_scheduler's warmup: max(1, int(total * ratio)), none at ratio 0."""
    return max(1, int(steps * cfg.train.warmup_ratio)) if cfg.train.warmup_ratio > 0 else 0


def hf_run(cfg, rows: list[dict], steps: int, accum: int, out: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t0 = time.perf_counter()
    model = lora_model(cfg)
    tokens = [0]
    model.register_forward_pre_hook(lambda _m, _a, kw: tokens.__setitem__(0, tokens[0] + kw["input_ids"].numel()),
                                    with_kwargs=True)
    marks: list[tuple[float, int]] = []  # (time, tokens so far) at each optimizer step's end

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append((time.perf_counter(), tokens[0]))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), tokens[0]))

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=accum, max_steps=steps,
        learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay, warmup_steps=warmup_steps(cfg, steps),
        lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="no", save_strategy="no", report_to="none",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=cfg.train.seed,
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=labelled(rows), callbacks=[StepTimes()])
    trainer.train()
    wall = time.perf_counter() - t0
    return rates(marks, wall)


def bare_run(cfg, rows: list[dict], steps: int, accum: int) -> dict:
    from alro_ray.train.worker import make_scheduler

    t0 = time.perf_counter()
    model = lora_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = make_scheduler(opt, steps, cfg.train.warmup_ratio, "linear")
    data = labelled(rows)
    marks, tokens = [(time.perf_counter(), 0)], 0
    for step in range(steps):
        for b in data[step * accum:(step + 1) * accum]:
            ids = b["input_ids"][None]
            loss = model(input_ids=ids, labels=b["labels"][None]).loss
            (loss / accum).backward()
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), tokens))
    return rates(marks, time.perf_counter() - t0)


def rates(marks: list[tuple[float, int]], wall: float) -> dict:
    """marks[0]: the first step's start, marks[k]: step k's end, each (time, tokens so far)."""
    (t_start, _), (t1, k1), (t_end, k_end) = marks[0], marks[1], marks[-1]
    return {"steady_tokens_per_s": (k_end - k1) / (t_end - t1) if len(marks) > 2 else None,
            "tokens_per_s": k_end / (t_end - t_start), "train_seconds": t_end - t_start, "whole_s": wall}


# ---------------------------------------------------------------------------------------------
# inference


def score_checkpoint(cfg, data_dir: Path, out: Path) -> Path:
    """A ranker with an untrained linear score head on the last layer (speed only)."""
    from alro_ray.data.dataset import read_stats
    from alro_ray.model.loading import load_tokenizer
    from alro_ray.model.score_head import attach_head
    from alro_ray.rank.ranker import save_ranker

    model_cfg = dataclasses.replace(cfg.model, head=HeadConfig(kind="linear", layer=-1))
    score_cfg = dataclasses.replace(cfg, model=model_cfg, loss=dataclasses.replace(cfg.loss, objective="score",
                                                                                  alpha=1.0, beta=0.0),
                                    train=dataclasses.replace(cfg.train, eval_mode="score"))
    model = lora_model(score_cfg)
    attach_head(model, model_cfg)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    return save_ranker(out, model, tok, score_cfg, read_stats(data_dir), str(data_dir))


def alro_eval(checkpoint: str, data_dir: Path, mode: str, out: Path, limit: int | None, cpus: int) -> dict:
    import pandas as pd

    from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation

    t0 = time.perf_counter()
    run_evaluation(checkpoint, out, data_dir, EvalSettings(modes=[mode], baselines=(), batch_size=BATCH,
                                                           limit=limit, cpus_per_actor=cpus))
    wall = time.perf_counter() - t0
    pred = pd.read_parquet(out / "predictions.parquet")
    n = len(pred)
    ranking = float(pred["seconds"].sum())  # per list: its batch's ranking time / batch rows
    return {"lists": n, "whole_s": wall, "lists_per_s": n / wall, "ranking_s": ranking,
            "ranking_lists_per_s": n / ranking}


def plain_eval(checkpoint: str, rows: list[dict], mode: str) -> dict:
    """What a user would write: PEFT model, left-padded batches, one forward, the letters' logits
    (one-pass) or the head on the last layer's states (score)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from alro_ray.config import Config, from_dict, read_yaml
    from alro_ray.data.tokenize import RankTokenizer
    from alro_ray.model.loading import load_base_model
    from alro_ray.model.score_head import ScoreHead

    t0 = time.perf_counter()
    ckpt = Path(checkpoint)
    cfg = from_dict(Config, read_yaml(ckpt / "config.yaml"))
    info = json.loads((ckpt / "ranker.json").read_text())
    model = PeftModel.from_pretrained(load_base_model(cfg.model, torch.float32), ckpt / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    c = int(info["candidates"])
    ident = torch.tensor(info["identifier_ids"][:c])
    head = None
    if mode == "score":
        entry = info["head"]
        head = ScoreHead(int(entry["hidden_size"]), HeadConfig(kind=entry["kind"], position=entry["position"],
                                                               layer=entry["layer"]))
        head.load_state_dict(load_file(str(ckpt / entry["weights"])))
        head.eval()
        finder = RankTokenizer(tok, c)
    prompts = [[int(x) for x in r["input_ids"][: int(r["slot_positions"][0])]] for r in rows]
    t1 = time.perf_counter()
    orders = []
    with torch.no_grad():
        for s in range(0, len(prompts), BATCH):
            chunk = prompts[s:s + BATCH]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            if mode == "one-pass":
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
                scores = torch.log_softmax(logits[:, -1, ident].float(), dim=-1)
            else:
                hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                               output_hidden_states=True).hidden_states[-1]
                at = torch.tensor([finder.candidate_positions(p, c, entry["position"]) for p in chunk])
                at = at + (width - torch.tensor([len(p) for p in chunk]))[:, None]
                states = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
                scores = head(states)
            orders += torch.argsort(scores, dim=-1, descending=True, stable=True).tolist()
    t2 = time.perf_counter()
    n = len(orders)
    return {"lists": n, "whole_s": t2 - t0, "lists_per_s": n / (t2 - t0), "ranking_s": t2 - t1,
            "ranking_lists_per_s": n / (t2 - t1)}


def plain_fresh(checkpoint: str, data_dir: Path, mode: str, lists: int | None) -> dict:
    """plain_eval as a user's script runs it: a new Python process (imports torch, transformers
    and PEFT, loads the model, ranks). Whole: the process's wall time, seen from here."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--plain-child", checkpoint, str(data_dir), mode, str(lists or 0)],
                          check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    n = child["lists"]
    return {**child, "whole_s": wall, "lists_per_s": n / wall}


def plain_child(checkpoint: str, data_dir: str, mode: str, lists: int) -> None:
    torch.set_num_threads(2)
    from alro_ray.data.dataset import read_split

    rows = read_split(data_dir, "test").to_dict("records")
    print(json.dumps(plain_eval(checkpoint, rows[:lists or None], mode)))


# ---------------------------------------------------------------------------------------------


def ratio(a, b):
    return a / b if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="N=5 steps of grad_accum 2, 2 rounds of each part, 32 lists ranked one-pass only")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps N (default 10, quick 5)")
    ap.add_argument("--grad-accum", type=int, default=2, help="alro_2w's grad_accum G (global batch 2G)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved training rounds (default 3, quick 2)")
    ap.add_argument("--eval-rounds", type=int, default=None, help="interleaved evaluation rounds (default 3, quick 2)")
    ap.add_argument("--lists", type=int, default=None, help="test lists ranked (default all 80, quick 32)")
    ap.add_argument("--eval-modes", default=None, help="ranking modes timed (default one-pass,score; quick one-pass)")
    ap.add_argument("--cpus-per-actor", type=int, default=2,
                    help="alro evaluate's --cpus-per-actor (default 2: the plain loop's 2 threads; 1 was the default before)")
    ap.add_argument("--skip-train", action="store_true",
                    help="evaluation only, one-pass with an untrained ranker (no train figures)")
    ap.add_argument("--plain-child", nargs=4, metavar=("CKPT", "DATA", "MODE", "LISTS"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.synthetic.users=400")
    args = ap.parse_args()
    if args.plain_child:
        ckpt, data, mode, n = args.plain_child
        return plain_child(ckpt, data, mode, int(n))
    steps = args.steps or (5 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 3)
    eval_rounds = args.eval_rounds or (2 if args.quick else 3)
    lists = args.lists or (32 if args.quick else None)
    eval_modes = [m for m in (args.eval_modes or ("one-pass" if args.quick else "one-pass,score")).split(",") if m]
    if not set(eval_modes) <= {"one-pass", "score"}:
        raise SystemExit(f"--eval-modes {args.eval_modes}: expected one-pass and/or score")
    g = args.grad_accum
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)

    from alro_ray.cluster import ensure_ray
    from alro_ray.data.dataset import read_split
    from alro_ray.data.prepare import prepare
    from alro_ray.evaluate.compare import untrained_ranker
    from alro_ray.model.loading import prepare_model_cache

    tmp = Path(tempfile.mkdtemp(prefix="alro-peers-"))
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [
        "loss.alpha=0", "loss.beta=0", "data.permutations=0", "data.split=[0.5,0.1,0.4]", "data.synthetic.users=200",
        f"train.max_steps_per_epoch={steps}", f"train.grad_accum={g}", "train.eval_users=4", "train.epochs=1",
        f"data.prepared={tmp / 'data'}", *args.overrides])
    t0 = time.perf_counter()
    prepare_model_cache(cfg.model)  # the model cache builds once ($ALRO_CACHE)
    ensure_ray()
    prepare(cfg, tmp / "data")
    setup_s = time.perf_counter() - t0
    data_dir = tmp / "data"
    train_rows = read_split(data_dir, "train").to_dict("records")
    test_rows = read_split(data_dir, "test").to_dict("records")[:lists]
    need = steps * 2 * g
    if len(train_rows) < need:
        raise SystemExit(f"{len(train_rows)} train rows, fewer than the {need} needed")
    print(f"prepared {len(train_rows)} train / {len(test_rows)} test rows in {setup_s:.0f} s (Ray start included)",
          flush=True)

    # --quick runs what the ratios need: alro_1w (the same code on one 2-thread worker) only in the full run
    variants = [v for v in TRAIN_VARIANTS if not (args.quick and v == "alro_1w")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    final = None
    if not args.skip_train:
        for r in range(rounds):
            for v in variants:
                out = tmp / f"{v}_{r}"
                if v == "alro_2w":
                    res = alro_run(cfg, out, 2, g)
                    final = res["final"]
                elif v == "alro_1w":
                    res = alro_run(cfg, out, 1, 2 * g)
                elif v == "hf_trainer":
                    res = hf_run(cfg, train_rows[:need], steps, 2 * g, out)
                else:
                    res = bare_run(cfg, train_rows[:need], steps, 2 * g)
                runs[v].append(res)
                print(f"round {r + 1} {v}: steady {res['steady_tokens_per_s'] or 0:.0f} tok/s, "
                      f"whole run {res['whole_s']:.1f} s", flush=True)
    else:
        final = str(untrained_ranker(cfg, data_dir, tmp / "untrained"))
    ckpts = {"one-pass": final}
    if "score" in eval_modes:
        ckpts["score"] = str(score_checkpoint(cfg, data_dir, tmp / "score_ranker"))

    evals: dict[str, list[dict]] = {f"{k}_{m}": [] for m in eval_modes for k in ("alro", "plain", "fresh")}
    for r in range(eval_rounds):
        for mode in eval_modes:
            ckpt = ckpts[mode]
            res = alro_eval(ckpt, data_dir, mode, tmp / f"eval_{mode}_{r}", lists, args.cpus_per_actor)
            evals[f"alro_{mode}"].append(res)
            res2 = plain_eval(ckpt, test_rows, mode)
            evals[f"plain_{mode}"].append(res2)
            res3 = plain_fresh(ckpt, data_dir, mode, lists)
            evals[f"fresh_{mode}"].append(res3)
            print(f"round {r + 1} {mode}: alro {res['lists_per_s']:.2f} lists/s whole ({res['ranking_lists_per_s']:.2f} "
                  f"ranking), plain {res2['lists_per_s']:.2f} ({res2['ranking_lists_per_s']:.2f}), "
                  f"plain in a fresh process {res3['lists_per_s']:.2f}", flush=True)

    figures: dict = {"train": {}, "eval": {}}
    for v, rs in runs.items():
        if rs:
            figures["train"][v] = {"steady_tokens_per_s": best_of(rs, "steady_tokens_per_s"),
                                   "tokens_per_s": best_of(rs, "tokens_per_s"),
                                   "whole_s": best_of(rs, "whole_s", high=False), "rounds": rs}
    for k, rs in evals.items():
        figures["eval"][k] = {"lists_per_s": best_of(rs, "lists_per_s"),
                              "ranking_lists_per_s": best_of(rs, "ranking_lists_per_s"),
                              "lists": rs[0]["lists"], "rounds": rs}
    tr, ev = figures["train"], figures["eval"]

    def steady(v):
        return tr.get(v, {}).get("steady_tokens_per_s")

    def lps(k, key="lists_per_s"):  # None for a mode not timed (--eval-modes)
        return ev.get(k, {}).get(key)

    result = {
        "train_ratio_peer": ratio(steady("alro_2w"), steady("hf_trainer")),
        "train_ratio_bare": ratio(steady("alro_2w"), steady("bare")),
        "train_ratio_1w_peer": ratio(steady("alro_1w"), steady("hf_trainer")),
        "eval_ratio_plain": ratio(lps("alro_one-pass"), lps("plain_one-pass")),
        "eval_ratio_plain_ranking": ratio(lps("alro_one-pass", "ranking_lists_per_s"),
                                          lps("plain_one-pass", "ranking_lists_per_s")),
        "eval_ratio_plain_score": ratio(lps("alro_score"), lps("plain_score")),
        "eval_ratio_plain_score_ranking": ratio(lps("alro_score", "ranking_lists_per_s"),
                                                lps("plain_score", "ranking_lists_per_s")),
        "eval_ratio_plain_fresh": ratio(lps("alro_one-pass"), lps("fresh_one-pass")),
        "eval_ratio_plain_fresh_score": ratio(lps("alro_score"), lps("fresh_score")),
    }
    mean_tokens = sum(len(r["input_ids"]) for r in train_rows[:need]) / need
    head = (f"SmolLM2-135M, LoRA r{cfg.model.lora.rank} on {','.join(cfg.model.lora.target_modules)}, SFT; "
            f"{steps} optimizer steps of {2 * g} samples (micro-batch 1), {mean_tokens:.0f} tokens per sample; "
            f"{rounds} training rounds, {eval_rounds} evaluation rounds on {len(test_rows)} test lists (batch {BATCH}); "
            f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(head)
    print("| variant | steady tokens/s | tokens/s (whole epoch) | whole run s | steady ratio to alro_2w |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for v, f in tr.items():
        print(f"| {v} | {f['steady_tokens_per_s'] or 0:.0f} | {f['tokens_per_s']:.0f} | {f['whole_s']:.1f} | "
              f"{ratio(f['steady_tokens_per_s'], steady('alro_2w')) or 0:.2f} |")
    print()
    print("| ranking | lists | lists/s (whole job) | lists/s (ranking only) |")
    print("| --- | ---: | ---: | ---: |")
    for k, f in ev.items():
        print(f"| {k} | {f['lists']} | {f['lists_per_s']:.2f} | {f['ranking_lists_per_s']:.2f} |")
    print()
    print(", ".join(f"{k} {v:.2f}" for k, v in result.items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "setting": head, **result,
                                               "figures": figures, "tmp": str(tmp)}, indent=2, default=str))


if __name__ == "__main__":
    main()
