"""Read YAML into an :class:`~configs.schema.ExperimentConfig`, once, at the edge.

Errors name the dotted path of the offending field and say what is allowed:

>>> load_config_dict({"model": {"chanels": 8}})
Traceback (most recent call last):
ConfigError: unknown key 'model.chanels' (did you mean 'model_channels'?); allowed keys in 'model': ...
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from configs.checks import ConfigError, check_cross_fields
from configs.schema import ExperimentConfig

__all__ = [
    "ConfigError",
    "load_config",
    "load_config_dict",
    "config_to_dict",
    "config_to_yaml",
    "apply_overrides",
    "parse_overrides",
]

log = logging.getLogger(__name__)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides.

    Errors say where the bad value came from: the file (with the line of a duplicated key), or
    the command-line overrides.
    """
    overrides = list(overrides)
    raw = read_with_base(Path(path)) if path is not None else {}
    where = f"{path}: " if path is not None else ""
    try:
        return load_config_dict(apply_overrides(raw, overrides))
    except ConfigError as exc:
        if overrides and not _fails(raw):
            raise ConfigError(f"command-line override(s) {' '.join(overrides)}: {exc}") from None
        raise ConfigError(f"{where}{exc}") from None


def _fails(raw: Mapping[str, Any]) -> bool:
    try:
        load_config_dict(raw)
    except ConfigError:
        return True
    return False


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


#: A file's top-level key naming the YAML file it amends (relative to the file).
BASE_KEY = "base"


def read_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping, on top of the file its ``base:`` names (recursively): a section the
    file gives updates the base's section key by key."""
    raw = read_yaml_mapping(path)
    if BASE_KEY not in raw:
        return raw
    base_path = (path.parent / str(raw.pop(BASE_KEY))).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {base_path} includes itself")
    merged = read_with_base(base_path, _seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b=value`` strings; values are read as YAML scalars or lists (``[1,2]``, ``true``, ``1e-4``)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be dotted, e.g. train.lr=1e-4")
        try:
            parsed.append((parts, yaml.safe_load(value) if value.strip() else ""))
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with the dotted overrides written into it."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for parts, value in parse_overrides(overrides):
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(parts)}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from plain data."""
    cfg = _build(ExperimentConfig, raw, path="")
    check_cross_fields(cfg)
    return cfg


def with_fields(cfg: ExperimentConfig, fields: Mapping[str, Any]) -> ExperimentConfig:
    """``cfg`` with the dotted ``fields`` that are not None replaced (``{"sampler.guidance_scale": 2.0}``),
    validated as a loaded config is, so a bad value names its field."""
    given = [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    return load_config_dict(apply_overrides(config_to_dict(cfg), given)) if given else cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML- and ``torch.save(weights_only)``-safe data (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{path or '<root>'}' must be a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            dotted = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            section = path or "<root>"
            raise ConfigError(
                f"unknown key '{dotted}'{hint}; allowed keys in '{section}': {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{path}.{name}" if path else name
        if name not in raw:
            continue
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, raw[name], dotted)
        else:
            value = _current_name(_coerce(raw[name], ftype, dotted), f.metadata, dotted)
            _check_rules(value, f.metadata, dotted)
            kwargs[name] = value
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, dotted: str):
    bad = ConfigError(f"'{dotted}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, dotted)
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{dotted}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"'{dotted}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _current_name(value: Any, rules: Mapping[str, Any], dotted: str) -> Any:
    """A deprecated value (``aliases`` rule) replaced by its current name, with a one-line warning."""
    aliases = rules.get("aliases", {})
    if not isinstance(value, str) or value not in aliases:
        return value
    log.warning("config '%s': %r is a deprecated name; read as %r", dotted, value, aliases[value])
    return aliases[value]


def _check_rules(value: Any, rules: Mapping[str, Any], dotted: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if "choices" in rules and v not in rules["choices"]:
            allowed = ", ".join(repr(c) for c in rules["choices"])
            raise ConfigError(f"'{dotted}' is {v!r}; allowed values: {allowed}")
        if "min" in rules and v < rules["min"]:
            raise ConfigError(f"'{dotted}' is {v!r}; it must be >= {rules['min']}")
        if "min_exclusive" in rules and v <= rules["min_exclusive"]:
            raise ConfigError(f"'{dotted}' is {v!r}; it must be > {rules['min_exclusive']}")
        if "max" in rules and v > rules["max"]:
            raise ConfigError(f"'{dotted}' is {v!r}; it must be <= {rules['max']}")
