"""`alro compare`: the paper's Table 2 + Table 4 for one dataset/config.

Classical baselines, then the LLM ladder on exactly the same test candidate lists:
  zero-shot / few-shot   the base model (an untrained, all-zero LoRA adapter), no / k demos
  SFT                    α = β = 0
  w/o SLL, w/o PSL       α = 0;  β = 0
  ALRO                   the config's α, β, γ
  SFT bootstrap@p        the SFT ranker, p candidate orders averaged (Table 4)
Every trained variant is a full `run_training` into OUTPUT/runs/<name>; every ranker is scored by
the batch evaluation job into OUTPUT/eval/<name>. Output: OUTPUT/compare.md and compare.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

from alro_ray import tracking
from alro_ray.config import Config
from alro_ray.rank.report import LISTS, TPQ, ndcg_table

log = logging.getLogger("alro_ray")

LADDER = ("zero-shot", "few-shot", "SFT", "w/o SLL", "w/o PSL", "ALRO")
CLASSICAL = ("random", "popularity", "item-mean", "mf", "gru4rec", "sasrec")
WEIGHTS = {"SFT": (0.0, 0.0), "w/o SLL": (0.0, None), "w/o PSL": (None, 0.0), "ALRO": (None, None)}


def slug(name: str) -> str:
    return name.lower().replace("/", "").replace(" ", "-")


def variant(cfg: Config, name: str, data_dir: Path) -> Config:
    alpha, beta = WEIGHTS[name]
    loss = dataclasses.replace(cfg.loss, alpha=cfg.loss.alpha if alpha is None else alpha,
                               beta=cfg.loss.beta if beta is None else beta)
    train = dataclasses.replace(cfg.train, run_name=slug(name))
    return dataclasses.replace(cfg, loss=loss, train=train,
                               data=dataclasses.replace(cfg.data, prepared=str(data_dir)))


def untrained_ranker(cfg: Config, data_dir: Path, out: Path) -> Path:
    """The base model as a ranker: PEFT initialises LoRA B to zero, so the adapter is a no-op."""
    from alro_ray.model.checkpoint import save_ranker
    from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
    from alro_ray.data.prepare import read_stats

    model = add_lora(load_base_model(cfg.model), cfg.model)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    return save_ranker(out, model, tok, cfg, read_stats(data_dir), data_dir)


def run_compare(cfg: Config, output_dir: str | Path, ladder: Sequence[str] = LADDER,
                baselines: Sequence[str] = CLASSICAL, bootstrap: Sequence[int] = (3, 5), mode: str = "generate",
                few_shot: int = 2, limit: int | None = None, actors: int = 1,
                fuse: Sequence[str] = (), fusion: str = "score") -> dict:
    """fuse: baselines to fuse every LLM row with (rows `<name> fused-<mode>-<baseline>`,
    the weight chosen on the valid split; rank/fusion.py)."""
    from alro_ray.rank.batch_eval import run_evaluation
    from alro_ray.errors import AlroError
    from alro_ray.train.trainer import resolve_data, run_training

    unknown = [n for n in ladder if n not in LADDER]
    if unknown:
        raise AlroError(f"unknown ladder step(s) {unknown}; choose from {list(LADDER)}")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(cfg, out)
    # MLflow (if tracking.mlflow is set): the table's rows in one run, the trained variants nested under it.
    run = tracking.start_run(cfg.tracking, f"compare {out.name}", run_dir=out, params=tracking.config_params(cfg),
                             tags={"alro.command": "compare"})
    rows: dict[str, dict] = {}

    def evaluate(name: str, checkpoint: Path, modes: list[str], with_baselines: bool = False, shots: int = 0):
        m = run_evaluation(checkpoint, out / "eval" / slug(name), data_dir=data, modes=modes,
                           baselines=list(baselines) if with_baselines else [], limit=limit, actors=actors,
                           few_shot=shots, fuse=fuse, fusion=fusion)
        if with_baselines:
            rows.update(m["baselines"])
        for mode_name, metrics in m["modes"].items():
            rows[name if mode_name == mode else f"{name} {mode_name}"] = \
                {**metrics, "fusion": m["fusion"][mode_name]} if mode_name in m.get("fusion", {}) else metrics
        _write(rows, out, cfg, mode)

    if "zero-shot" in ladder or "few-shot" in ladder:
        base = untrained_ranker(cfg, data, out / "runs" / "base")
        if "zero-shot" in ladder:
            evaluate("zero-shot", base, [mode], with_baselines=True)
        if "few-shot" in ladder:
            evaluate(f"few-shot ({few_shot})", base, [mode], shots=few_shot)
    for name in (n for n in ladder if n in WEIGHTS):
        outcome = run_training(variant(cfg, name, data), out / "runs" / slug(name),
                               tracking_parent=run.run_id if run else None)
        extra = [f"bootstrap@{p}" for p in bootstrap] if name == "SFT" else []
        evaluate(name, outcome.final_dir, [mode, *extra], with_baselines=not rows)
    tracking.log_compare(run, rows, out)
    return rows


def _write(rows: dict[str, dict], out: Path, cfg: Config, mode: str) -> None:
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    t = cfg.train
    cap = f", at most {t.max_steps_per_epoch} steps of {t.num_workers}x{t.micro_batch}x{t.grad_accum} samples" \
        if t.max_steps_per_epoch else ""
    lines = [f"Ranking mode: {mode}. Data: H={cfg.data.history}, C={cfg.data.candidates}, model {cfg.model.name}, "
             f"{t.epochs} epoch(s){cap}, lr {t.lr}; α={cfg.loss.alpha}, β={cfg.loss.beta}, γ={cfg.loss.gamma}.", "",
             ndcg_table(rows, [TPQ, LISTS])]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    log.info("compare table so far:\n%s", "\n".join(lines))
