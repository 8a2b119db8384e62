"""The adapter registry: request field `adapter` -> checkpoint directory, fixed and checked at start."""

from dataclasses import dataclass, field
from pathlib import Path

from alro_ray.config import read_yaml
from alro_ray.errors import AlroError, ConfigError
from alro_ray.model.ranker_info import RankerInfo, read_ranker_info
from alro_ray.rank.fusion import read_fusion_defaults
from alro_ray.serve.contract import Fusion


@dataclass(frozen=True)
class AdapterEntry:
    """One registry entry, read from the checkpoint's ranker.json and config.yaml at start."""

    name: str
    path: str  # absolute checkpoint directory (never shown to clients)
    info: RankerInfo  # ranker.json
    model: dict  # the `model:` section of its training config
    fusion: dict = field(default_factory=dict)  # fusion.json: "<mode>/<classical>" -> saved weight, method
    peft_name: str = ""  # the adapter's name inside the PEFT model, safe whatever `name` is: "adapter<i>"

    @property
    def candidates(self) -> int:
        return self.info.candidates

    def public(self) -> dict:
        i = self.info
        return {"name": self.name, "base_model": i.base_model, "candidates": i.candidates, "history": i.history,
                "domain_plural": i.domain_plural, "attribute_name": i.attribute_name,
                "fusion_defaults": {k: {"weight": v["weight"], "method": v["method"]} for k, v in self.fusion.items()}}

    def fusion_settings(self, mode: str, classical: str, weight: float | None, method: str | None) -> Fusion:
        """A request's fusion with its weight (and method) filled in from the saved defaults when
        it names none; raises ValueError (a 422) when there is nothing to fill it with."""
        if weight is not None:
            return Fusion(classical, weight, method or "score")
        key = f"{mode}/{classical}"
        saved = self.fusion.get(key)
        if saved is None:
            raise ValueError(f"fusion names no weight and adapter {self.name!r} has none saved for mode {mode!r} "
                             f"with {classical!r} (saved: {sorted(self.fusion) or 'none'}): pass "
                             f"fusion.weight, or save one with `alro evaluate --fuse {classical} --save-fusion`")
        if method not in (None, saved["method"]):
            raise ValueError(f"adapter {self.name!r}'s saved weight for {key} was chosen for fusion method "
                             f"{saved['method']!r}, not {method!r}: pass fusion.weight too")
        return Fusion(classical, saved["weight"], saved["method"], weight_from="adapter")


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
    for i, (name, raw) in enumerate(adapters.items()):
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        try:
            info = read_ranker_info(path)
        except AlroError as e:
            raise ConfigError(f"serve: adapter {name!r}: {e}") from e
        model = read_yaml(path / "config.yaml").get("model") or {}
        try:
            fusion = read_fusion_defaults(path)
        except AlroError as e:
            raise ConfigError(f"serve: adapter {name!r}: {e}") from e
        registry[name] = AdapterEntry(name, str(path), info, model, fusion, peft_name=f"adapter{i}")
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
