"""Loading configs: YAML files (with `extends:`), `section.key=value` overrides, strict typing."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from alro_ray.config.sections import Config
from alro_ray.errors import ConfigError
from alro_ray.files import write_text



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
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):  # here once: every range check after it may trust `<` (NaN < 0 is false)
            raise ConfigError(f"{key} must be a finite number, got {number}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


# Keys that older versions wrote (checkpoints' config.yaml keeps them): accepted and ignored, so
# every saved config still loads.
RETIRED_KEYS = {"train.inject_failure_epoch"}  # a test hook, replaced by SIGKILL in the tests


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict, strictly."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if f"{prefix}{k}" not in RETIRED_KEYS}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check_type(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def from_record(cls: type, data: dict, fmt: str, where: str, error: type = ConfigError, fix: str = "") -> Any:
    """A versioned on-disk record (stats.json, ranker.json) as dataclass `cls`: its `format` must
    be `fmt` and every field without a default present (else `error` naming `where`, then `fix`);
    keys a newer version added are dropped, so older readers still read newer files."""
    fix = f"; {fix}" if fix else ""
    if data.get("format") != fmt:
        raise error(f"{where}: format {data.get('format')!r}, expected {fmt!r}{fix}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in fields.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{where}: missing {missing}{fix}")
    return cls(**{k: v for k, v in data.items() if k in fields})


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
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
