"""Configs: every YAML in configs/ loads and validates; loading is strict and errors name the key."""

from pathlib import Path

import pytest

from alro_ray.config import Config, load_config
from alro_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "quickstart", "cpu_small", "paper_gpu", "tune_tiny", "tune_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_yaml_in_configs_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert 2 <= cfg.data.candidates <= 26 and cfg.data.history >= 1


def test_paper_gpu_config_is_the_papers_setting():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper_gpu.yaml")
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma) == (0.1, 0.01, 2.0)
    assert (cfg.model.lora.rank, cfg.train.lr, cfg.train.micro_batch, cfg.train.grad_accum) == (16, 1e-4, 1, 32)
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.zero_stage, cfg.train.precision) == (8, True, 2, "bf16")
    assert (cfg.data.history, cfg.data.candidates, cfg.train.epochs) == (20, 25, 10)


@pytest.mark.parametrize("override, message", [
    (["data.histroy=3"], "unknown config key data.histroy"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["train.use_gpu=1"], "train.use_gpu must be true or false"),
    (["data.dataset=netflix"], "data.dataset must be one of"),
    (["data.candidates=27"], "data.candidates must be between 2 and 26"),
    (["loss.alpha=-0.1"], "loss.alpha must be >= 0"),
    (["tune.search_space={alpha: {low: 1, high: 0.1}}"], "empty or inverted range"),
    (["tune.search_space={delta: {low: 0.1, high: 1}}"], "tune.search_space.delta: not a tunable"),
    (["tune.num_samples=0"], "tune.num_samples and tune.max_concurrent must be >= 1"),
    (["nokey"], "must look like section.key=value"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, override)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs must be an integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_apply_after_the_file():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["data.history=3", "model.lora.target_modules=[q_proj]"])
    assert cfg.data.history == 3 and cfg.model.lora.target_modules == ["q_proj"] and cfg.model.name == "tiny-random"
