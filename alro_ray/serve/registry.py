"""The adapter registry: request field `adapter` -> checkpoint directory, fixed and checked at start."""

from dataclasses import dataclass
from pathlib import Path

from alro_ray.config import read_yaml
from alro_ray.errors import AlroError, ConfigError
from alro_ray.model.ranker_info import RankerInfo, read_ranker_info


@dataclass(frozen=True)
class AdapterEntry:
    """One registry entry, read from the checkpoint's ranker.json and config.yaml at start."""

    name: str
    path: str  # absolute checkpoint directory (never shown to clients)
    info: RankerInfo  # ranker.json
    model: dict  # the `model:` section of its training config

    @property
    def candidates(self) -> int:
        return self.info.candidates

    def public(self) -> dict:
        i = self.info
        return {"name": self.name, "base_model": i.base_model, "candidates": i.candidates, "history": i.history,
                "domain_plural": i.domain_plural, "attribute_name": i.attribute_name}


def _base_key(entry: AdapterEntry) -> dict:
    """What must be equal for two adapters to sit on one base model."""
    model = entry.model
    key = {"base_model": entry.info.base_model, "model.name": model.get("name"),
           "model.tokenizer": model.get("tokenizer"), "tokenizer": entry.info.tokenizer}
    if model.get("name") == "tiny-random":  # its weights come from the shape and seed
        key["model.tiny"] = model.get("tiny")
    return key


def load_registry(adapters: dict[str, str], base_dir: str | None = None) -> dict[str, AdapterEntry]:
    """Check every checkpoint of the registry and that they share one base model."""
    root = Path(base_dir) if base_dir else Path.cwd()
    registry: dict[str, AdapterEntry] = {}
    for name, raw in adapters.items():
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        try:
            info = read_ranker_info(path)
        except AlroError as e:
            raise ConfigError(f"serve: adapter {name!r}: {e}") from e
        model = read_yaml(path / "config.yaml").get("model") or {}
        registry[name] = AdapterEntry(name, str(path), info, model)
    entries = list(registry.values())
    first = entries[0]
    for other in entries[1:]:
        a, b = _base_key(first), _base_key(other)
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise ConfigError(
                f"serve: adapters {first.name!r} and {other.name!r} have different base models "
                f"({diff}); all adapters of one registry must share a base model: serve them as "
                f"separate applications"
            )
    return registry


def adapters_from_args(checkpoint: str | None = None, adapter: list[str] | None = None) -> dict[str, str]:
    """`--checkpoint DIR` (adapter name "default") and repeated `--adapter name=DIR` -> registry."""
    adapters: dict[str, str] = {}
    if checkpoint:
        adapters["default"] = checkpoint
    for text in adapter or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects name=DIR, got {text!r}")
        if name in adapters:
            raise ConfigError(f"adapter {name!r} given twice")
        adapters[name] = path
    if not adapters:
        raise ConfigError("give --checkpoint DIR or at least one --adapter name=DIR")
    return adapters
