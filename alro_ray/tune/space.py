"""A study's search space and each trial's config: what `tune` validates, samples and trains."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from alro_ray.config import TUNABLE, Config, ConfigError, from_dict, to_dict
from alro_ray.tracking import absolute_uri

log = logging.getLogger("alro_ray")

# The paper's loss weights (§5.3): the first point every study evaluates.
PAPER_POINT = {"alpha": 0.1, "beta": 0.01, "gamma": 2.0}
NDCG_KEYS = ("valid_ndcg@3", "valid_ndcg@10", "valid_ndcg@25")


def check_tune_config(cfg: Config) -> None:
    """What `Config.validate` cannot know: the metric must be one the Train run reports."""
    cfg.validate()
    if cfg.tune.metric not in NDCG_KEYS:
        raise ConfigError(f"tune.metric must be one of {list(NDCG_KEYS)} (maximised), got {cfg.tune.metric!r}")
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one of " + ", ".join(TUNABLE))
    for name, r in cfg.tune.search_space.items():  # an end the config refuses would fail trials, not the study
        for end in (r.low, r.high):
            try:
                trial_config(cfg, {name: end})
            except ConfigError as e:
                raise ConfigError(f"tune.search_space.{name}: the range [{r.low}, {r.high}] reaches a value the "
                                  f"config refuses ({e})") from None


def search_space(cfg: Config) -> dict:
    from ray import tune  # heavy: only when a study starts (the CLI imports this module)

    return {name: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
            for name, r in cfg.tune.search_space.items()}


def config_value(cfg: Config, key: str):
    """`cfg` at a dotted `section.name` key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def first_point(cfg: Config) -> dict | None:
    """The paper's α, β, γ (and the config's own value of any other tuned parameter), or None
    when the search space leaves one of them out of range."""
    point = {name: PAPER_POINT.get(name, config_value(cfg, TUNABLE[name])) for name in cfg.tune.search_space}
    outside = [f"{n}={v} not in [{r.low}, {r.high}]" for n, r in cfg.tune.search_space.items()
               for v in [point[n]] if not r.low <= v <= r.high]
    if outside:
        log.warning("the paper's point is outside the search space (%s): not evaluated first", "; ".join(outside))
        return None
    return point


def trial_config(base: Config, params: dict) -> Config:
    """`base` with the trial's parameters set (names from `config.TUNABLE`), validated."""
    cfg = from_dict(Config, copy.deepcopy(to_dict(base)))
    for name, value in params.items():
        if name not in TUNABLE:
            raise ConfigError(f"{name}: not a tunable parameter (tunable: {', '.join(TUNABLE)})")
        section, key = TUNABLE[name].split(".")
        setattr(getattr(cfg, section), key, float(value))
    return cfg.validate()


def absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: relative paths that exist here are
    made absolute so trials find them (on a cluster they must be on storage every node sees)."""
    for key in ("model.name", "model.tokenizer", "model.cache_dir", "data.data_dir", "data.prepared"):
        value = config_value(cfg, key)
        if value and Path(value).exists():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, str(Path(value).resolve()))
    cfg.tracking.mlflow = absolute_uri(cfg.tracking.mlflow)  # a local MLflow store, too
    return cfg
