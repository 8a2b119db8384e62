"""Typed configuration: dataclasses loaded from YAML with command-line overrides.

One `Config` holds everything a run needs. YAML files in `configs/` are partial configs: keys
they leave out keep the dataclass defaults. Loading is strict: an unknown key or a value of the
wrong type is a `ConfigError` that names the dotted key, so a typo never silently does nothing.

Overrides are `section.key=value` strings (the value parsed as YAML, so `3`, `0.1`, `true`,
`[a, b]` and `null` work), applied after the file.
"""

from alro_ray.config.data import (
    DATASETS,
    HINTS,
    MAX_CANDIDATES,
    MAX_RATING,
    RETRIEVER_HINTS,
    DataConfig,
    GradingConfig,
    RetrievalConfig,
    SyntheticConfig,
)
from alro_ray.config.loading import (
    apply_overrides,
    from_dict,
    from_record,
    load_config,
    parse_override,
    parse_yaml,
    read_yaml,
    save_config,
    to_dict,
)
from alro_ray.config.sections import (
    RANK_MODES,
    SCORE_LOSSES,
    TUNABLE,
    Config,
    HeadConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    SearchRange,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from alro_ray.errors import ConfigError  # noqa: F401  (raised by everything above)

__all__ = [
    "RETRIEVER_HINTS",
    "RetrievalConfig",
    "RANK_MODES",
    "SCORE_LOSSES",
    "DATASETS",
    "HINTS",
    "MAX_CANDIDATES",
    "MAX_RATING",
    "DataConfig",
    "GradingConfig",
    "SyntheticConfig",
    "apply_overrides",
    "from_dict",
    "from_record",
    "load_config",
    "parse_override",
    "parse_yaml",
    "read_yaml",
    "save_config",
    "to_dict",
    "TUNABLE",
    "Config",
    "HeadConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "SearchRange",
    "TinyModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "ConfigError",
]
