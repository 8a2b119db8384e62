"""Configs: every YAML in configs/ loads and validates; loading is strict and errors name the key."""

import re
from pathlib import Path

import pytest

from alro_ray.config import Config, load_config, parse_yaml
from alro_ray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))  # configs/ablation/ too: they extend the ones above


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "quickstart", "cpu_small", "paper_gpu", "tune_tiny", "tune_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR).with_suffix("")))
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
    (["model.lora.layers=0"], "model.lora.layers must be >= 1"),
    (["data.hint_folds=0"], "data.windows_per_user, data.tokenize_actors and data.hint_folds must be >= 1"),
    (["train.ema_decay=1"], "train.ema_decay must be in .* got 1"),
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


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E+30", 1e30), ("2.5e-3", 2.5e-3), (".5e-2", 0.005),
                                         ("3e2", 300.0), ("0.0001", 1e-4)])
def test_scientific_notation_is_a_number_on_the_command_line_and_in_yaml(tmp_path, text, value):
    assert load_config(None, [f"train.lr={text}"]).train.lr == value
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  lr: {text}\n")
    assert load_config(f).train.lr == value
    assert parse_yaml(f"-{text}") == -value


def test_text_that_only_looks_numeric_stays_text():
    with pytest.raises(ConfigError, match="train.lr must be a number, got '1e'"):
        load_config(None, ["train.lr=1e"])


def test_an_error_in_an_override_names_the_override_not_the_file():
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"^override 'train.lr=fast': train.lr must be a number"):
        load_config(tiny, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"^override 'loss.gamma=0': loss.gamma must be > 0"):
        load_config(tiny, ["data.history=3", "loss.gamma=0"])
    # A cross-field check the overrides broke, though the message names another key.
    with pytest.raises(ConfigError, match=r"^override 'data.dataset=amazon': data.data_dir is required"):
        load_config(tiny, ["data.dataset=amazon"])


def test_extends_builds_on_a_base_config(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  history: 7\n  candidates: 5\ntrain:\n  lr: 1e-3\n  epochs: 3\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\ntrain:\n  epochs: 4\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\ndata:\n  candidates: 6\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.lr=2e-3"])
    assert (cfg.data.history, cfg.data.candidates, cfg.train.epochs, cfg.train.lr) == (7, 6, 4, 2e-3)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_retired_keys_of_saved_configs_still_load(tmp_path):
    old = tmp_path / "old.yaml"  # what a checkpoint written before the key was retired holds
    old.write_text("train:\n  epochs: 2\n  inject_failure_epoch: null\n")
    assert load_config(old).train.epochs == 2


@pytest.mark.parametrize("override", ["train.lr=.nan", "loss.alpha=.nan", "loss.gamma=.inf", "train.lr=1e999",
                                      "data.rating_scale=[0, .nan]", "train.ema_decay=-.inf",
                                      "tune.search_space={alpha: {low: .nan, high: 1}}",
                                      "data.grading={method: bins, bins: [1, .inf]}"])
def test_nan_and_inf_are_refused_wherever_a_number_is_read(override):
    """One check in the typed reader, so no range check has to remember NaN (NaN < 0 is false)."""
    key = override.split("=")[0].split("{")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.* must be a finite number, got (nan|inf|-inf)"):
        load_config(None, [override])


def test_serve_settings_refuse_nan_through_the_same_check():
    from alro_ray.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="serve.retry_budget_s must be a finite number, got nan"):
        ServeSettings.from_dict({"adapters": {"default": "ckpt"}, "retry_budget_s": float("nan")})


@pytest.mark.parametrize("override, message", [
    ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch must be >= 0 (0 or null: the whole epoch), got -1"),
    ("data.max_title_chars=0", "data.max_title_chars must be >= 1, got 0"),
    ("data.max_attribute_chars=-1", "data.max_attribute_chars must be >= 0 (0: no attributes), got -1"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.log_seconds=-1", "train.log_seconds must be >= 0 (0: by log_every alone), got -1"),
    ("train.weight_decay=-0.01", "train.weight_decay must be >= 0, got -0.01"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio must be in [0, 1], got 1.5"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio must be in [0, 1], got -0.1"),
    ("train.eval_users=-3", "train.eval_users must be >= 0 (0 or null: every validation user), got -3"),
])
def test_nonsense_ranges_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.max_steps_per_epoch=0", "train.eval_users=0", "train.warmup_ratio=0",
                                      "train.warmup_ratio=1", "data.max_attribute_chars=0", "train.weight_decay=0",
                                      "data.allow_negative_timestamps=true"])
def test_edge_values_that_mean_something_load(override):
    load_config(None, [override])
