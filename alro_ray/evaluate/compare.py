"""`alro compare`: the paper's Table 2 + Table 4 for one dataset/config.

Classical baselines, then the LLM ladder on exactly the same test candidate lists:
  zero-shot / few-shot   the base model (an untrained, all-zero LoRA adapter), no / k demos
  SFT                    α = β = 0
  w/o SLL, w/o PSL       α = 0;  β = 0
  ALRO                   the config's α, β, γ
  SFT bootstrap@p        the SFT ranker, p candidate orders averaged (Table 4)
then any named variants (`--variant score=configs/ml100k_score.yaml`: a config trained as it is,
e.g. a score head with prompt hints, checked to rank the same lists). Every trained variant is a
full `run_training` into OUTPUT/runs/<name>; every ranker is scored by the batch evaluation job
into OUTPUT/eval/<name>. Rows are named as evaluate/results.py says (`mf`, `llm-alro-generate`,
`fused-score-mf`); the table, per-user rankings and paired intervals go to OUTPUT (results.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import shutil
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from alro_ray import tracking
from alro_ray.config import Config, save_config
from alro_ray.data.dataset import read_split, read_stats
from alro_ray.errors import AlroError
from alro_ray.evaluate.batch_eval import EvalSettings, run_evaluation
from alro_ray.evaluate.results import MethodResult, baseline_results, ranker_results, read_results, write_results
from alro_ray.model.loading import add_lora, load_base_model, load_tokenizer
from alro_ray.rank.ranker import save_ranker
from alro_ray.train.trainer import prepared_with, resolve_data, run_training

LADDER = ("zero-shot", "few-shot", "SFT", "w/o SLL", "w/o PSL", "ALRO")
CLASSICAL = ("random", "popularity", "item-mean", "mf", "gru4rec", "sasrec")
WEIGHTS = {"SFT": (0.0, 0.0), "w/o SLL": (0.0, None), "w/o PSL": (None, 0.0), "ALRO": (None, None)}


def slug(name: str) -> str:
    return name.lower().replace("/", "").replace(" ", "-")


RANKER_ROWS = ("llm-", "fused-")  # every other row is a classical one (this run's or a merged run's)


def table_order(names: Sequence[str], baselines: Sequence[str] = CLASSICAL) -> list[str]:
    """Rows as the paper's tables read: the classical baselines, then the ranker rows by ladder
    step (zero-shot, few-shot, the variants, SFT, w/o SLL, w/o PSL, ALRO), each step's fused rows
    after its own; merged and new rows alike."""
    def step(name: str) -> float:
        body = name.split("-", 1)[1]  # llm-<row> or fused-<row>-<baseline>
        for i, s in enumerate(LADDER):
            if body == slug(s) or body.startswith(slug(s) + "-"):
                return i
        return LADDER.index("SFT") - 0.5  # a --variant: trained rows come after the untrained ones

    rankers = sorted((n for n in names if n.startswith(RANKER_ROWS)), key=step)  # stable: llm row, then fused
    merged = [n for n in names if not n.startswith(RANKER_ROWS) and n not in baselines]  # another run's classical rows
    return [b for b in baselines if b in names] + merged + rankers


def seed_row(name: str, seed: int, own: int | None) -> str:
    """The row of a recipe trained with train.seed `seed`: `name` for the config's own seed `own`,
    `name-seed<s>` for the others, whatever the order of --seeds, so that seeds trained in separate
    runs merge (results.seed_groups and evaluate/claims.py find them again)."""
    return name if seed == own else f"{name}-seed{seed}"


def seeded(name: str, cfg: Config, seeds: Sequence[int]) -> list[tuple[str, Config]]:
    """(row name, config) per train.seed (`seed_row`); no seeds: the config's own. Each runs as its row."""
    rows = [(seed_row(name, s, cfg.train.seed), s) for s in seeds] or [(name, cfg.train.seed)]
    return [(row, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=s, run_name=slug(row))))
            for row, s in rows]


def variant(cfg: Config, name: str, data_dir: Path) -> Config:
    alpha, beta = WEIGHTS[name]
    loss = dataclasses.replace(cfg.loss, alpha=cfg.loss.alpha if alpha is None else alpha,
                               beta=cfg.loss.beta if beta is None else beta)
    train = dataclasses.replace(cfg.train, run_name=slug(name))
    return dataclasses.replace(cfg, loss=loss, train=train,
                               data=dataclasses.replace(cfg.data, prepared=str(data_dir)))


def untrained_ranker(cfg: Config, data_dir: Path, out: Path) -> Path:
    """The base model as a ranker: PEFT initialises LoRA B to zero, so the adapter is a no-op."""
    model = add_lora(load_base_model(cfg.model), cfg.model)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    return save_ranker(out, model, tok, cfg, read_stats(data_dir), data_dir)


def same_lists(a: Path, b: Path, split: str = "test") -> None:
    """Refuse prepared data whose `split` lists (users and candidate sets) differ from `a`'s: a
    variant may render prompts differently (e.g. data.hints), never rank other lists."""

    def lists(d):
        return {r["user"]: sorted(r["candidate_ids"]) for r in read_split(d, split).to_dict("records")}
    if lists(a) != lists(b):
        raise AlroError(f"{b}: its {split} lists differ from {a}'s; a compare variant may change how prompts are "
                        f"rendered, not the data's users, windows or split (data.seed, history, candidates)")


def shares_data(vcfg: Config, data: Path) -> bool:
    """Whether a variant's data settings are the ones `data` was prepared with: then it trains and
    ranks on that directory (its prompts, and the states stored for them, e.g. by
    train.cache_lower_layers) instead of preparing the same prompts again under its own run."""
    return not vcfg.data.prepared and prepared_with(vcfg, data)


@dataclass
class CompareSettings:
    """What `run_compare` ranks besides the baselines (the options of `alro compare`)."""

    ladder: Sequence[str] = LADDER  # the paper's rows, trained from the config
    baselines: Sequence[str] = CLASSICAL
    bootstrap: Sequence[int] = (3, 5)  # the SFT model's bootstrap@p rows
    mode: str = "generate"  # every ladder row's ranking mode
    few_shot: int = 2  # demonstrations of the few-shot row
    limit: int | None = None  # only the first N test users
    actors: int = 1
    fuse: Sequence[str] = ()  # baselines to fuse every ranker row with (weight chosen on valid)
    fusion: str = "score"
    # name -> a config trained as it is and ranked in its train.eval_mode (e.g. a score head with hints)
    variants: dict[str, Config] = field(default_factory=dict)
    merge: Sequence[str | Path] = ()  # earlier compare outputs on the same test lists whose rows join
    seeds: Sequence[int] = ()  # train every trained row once per train.seed; table each recipe's mean
    reorders: int = 0  # every LLM row's lists ranked again under p candidate orders (evaluate/stability.py)
    reuse_states: bool = False  # mode score of frozen-LM rows on stored states (evaluate/stored_states.py)


@dataclass
class Comparison:
    """One comparison's table as it grows: every row is written out as soon as it is ranked."""

    cfg: Config
    out: Path
    data: Path
    settings: CompareSettings
    run: object  # the MLflow run (tracking.start_run), or None
    results: dict[str, MethodResult] = field(default_factory=dict)
    merged: dict[str, MethodResult] = field(default_factory=dict)
    table: dict[str, dict] = field(default_factory=dict)

    def merge(self) -> None:
        """Read the merged rows before any training: a wrong directory fails now, not after an hour."""
        for d in self.settings.merge:
            self.merged.update({k: v for k, v in read_results(d).items() if k not in self.merged})
            for f in Path(d).glob("config-*.yaml"):
                if not (self.out / f.name).exists():
                    shutil.copy2(f, self.out / f.name)

    def train(self, name: str, variant_cfg: Config) -> tuple[Path, dict]:
        t0 = time.time()
        outcome = run_training(variant_cfg, self.out / "runs" / slug(name),
                               tracking_parent=self.run.run_id if self.run else None)
        samples = sum(int(h.get("train_samples", 0)) for h in outcome.history)
        return outcome.final_dir, {"train_samples": samples, "train_seconds": time.time() - t0}

    def evaluate(self, name: str, checkpoint: Path, modes: list[str], data_dir: Path | None = None, shots: int = 0,
                 train: dict | None = None) -> None:
        s, where = self.settings, self.out / "eval" / slug(name)
        m = run_evaluation(checkpoint, where, data_dir or self.data, EvalSettings(
            modes=modes, baselines=[], limit=s.limit, actors=s.actors, few_shot=shots, fuse=s.fuse, fusion=s.fusion,
            reorders=s.reorders, reuse_states=s.reuse_states))
        predictions = pd.read_parquet(where / "predictions.parquet")
        self.results.update(ranker_results(predictions, slug(name), m["modes"], m.get("fusion", {}), train))
        self.tabulate(set(predictions["user"]), s.limit)

    def tabulate(self, users: set | None, first: int | None) -> None:
        """Write the table so far; the baselines are fitted once, on `users` (the first ranked lists)."""
        s = self.settings
        if s.baselines and s.baselines[0] not in self.results:
            self.results.update(baseline_results(self.data, s.baselines, users=users))
        rows = {**self.results, **{k: v for k, v in self.merged.items() if k not in self.results}}
        ordered = {name: rows[name] for name in table_order(list(rows), s.baselines)}
        header = _header(self.cfg, s.mode if s.ladder else None, first) + (
            f" Rows merged from {', '.join(map(str, s.merge))} (their settings: details.json, config-*.yaml)."
            if s.merge else "")
        classical = [n for n in ordered if not n.startswith(RANKER_ROWS)]
        self.table = write_results(self.out, ordered, header, self.cfg.data.protocol, classical)


def run_compare(cfg: Config, output_dir: str | Path, settings: CompareSettings | None = None) -> dict[str, dict]:
    """The untrained rows, each of the variants, then the trained ladder, on the same test lists
    as the classical baselines. Writes OUTPUT/compare.json, predictions.parquet, details.json and
    compare.md (evaluate/results.py) after every row; returns the table. Merged rows come from
    earlier compare outputs on the same test lists (this run's rows win a name clash; the lists are
    checked to be the same). With nothing to rank (no ladder, no variants) the table holds the
    baselines and the merged rows: a way to put earlier runs' rows together."""
    s = settings or CompareSettings()
    if cfg.data.protocol == "topn" and "retriever" not in s.baselines:  # the order a reranker has to beat
        s = dataclasses.replace(s, baselines=("retriever", *s.baselines))
    unknown = [n for n in s.ladder if n not in LADDER]
    if unknown:
        raise AlroError(f"unknown ladder step(s) {unknown}; choose from {list(LADDER)}")
    if s.reorders < 0:  # before any training
        raise AlroError(f"--reorders {s.reorders}: expected a number of reorders >= 0 (0: off)")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(cfg, out)
    save_config(cfg, out / "config.yaml")
    # MLflow (if tracking.mlflow is set): the table's rows in one run, the trained variants nested under it.
    run = tracking.start_run(cfg.tracking, f"compare {out.name}", run_dir=out, params=tracking.config_params(cfg),
                             tags={"alro.command": "compare"})
    c = Comparison(cfg, out, data, s, run)
    c.merge()
    if "zero-shot" in s.ladder or "few-shot" in s.ladder:
        base = untrained_ranker(cfg, data, out / "runs" / "base")
        if "zero-shot" in s.ladder:
            c.evaluate("zero-shot", base, [s.mode], train={"train_samples": 0})
        if "few-shot" in s.ladder:
            c.evaluate("few-shot", base, [s.mode], shots=s.few_shot, train={"train_samples": 0})
    for vname, vcfg in s.variants.items():
        vdata = data
        if not shares_data(vcfg, data):
            vdata = resolve_data(vcfg, out / "runs" / slug(vname))
            same_lists(data, vdata)
        for name, scfg in seeded(vname, vcfg, s.seeds):
            save_config(scfg, out / f"config-{slug(name)}.yaml")
            scfg = dataclasses.replace(scfg, data=dataclasses.replace(scfg.data, prepared=str(vdata)))
            final, cost = c.train(name, scfg)
            c.evaluate(name, final, [scfg.train.eval_mode], data_dir=vdata, train=cost)
    for step in (n for n in s.ladder if n in WEIGHTS):
        for name, scfg in seeded(step, variant(cfg, step, data), s.seeds):
            final, cost = c.train(name, scfg)
            c.evaluate(name, final, [s.mode, *([f"bootstrap@{p}" for p in s.bootstrap] if step == "SFT" else [])],
                       train=cost)
    if not c.table:  # nothing was ranked: the baselines on the merged rows' lists (or every test list)
        c.tabulate(set(next(iter(c.merged.values())).rankings) if c.merged else None, None)
    tracking.log_compare(run, c.table, out)
    return c.table


def _header(cfg: Config, mode: str | None, limit: int | None) -> str:
    """The data and protocol, then the ladder's settings; mode None: no ladder row was trained, and
    each variant's settings are in its config-*.yaml, not in the base config's train and loss."""
    t, d = cfg.train, cfg.data
    protocol = (f" Top-N: the retriever's top {d.candidates} of the catalogue, the last {d.holdout} ratings "
                f"held out; NDCG end-to-end (ideal: the whole held-out set)." if d.protocol == "topn" else "")
    data = (f"Data: {d.dataset}, H={d.history}, C={d.candidates}{f', first {limit} test users' if limit else ''}; "
            f"model {cfg.model.name}.{protocol}")
    if mode is None:
        return f"{data} No ladder row (each variant's settings: its config-*.yaml)."
    cap = f", at most {t.max_steps_per_epoch} steps of {t.num_workers}x{t.micro_batch}x{t.grad_accum} samples" \
        if t.max_steps_per_epoch else ""
    return (f"{data} Ladder rows: ranking mode {mode}, {t.epochs} epoch(s){cap}, lr {t.lr}; "
            f"α={cfg.loss.alpha}, β={cfg.loss.beta}, γ={cfg.loss.gamma}.")
