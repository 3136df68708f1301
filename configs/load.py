"""Read YAML into an :class:`~configs.schema.ExperimentConfig`, once, at the edge.

Errors name the dotted path of the offending field and say what is allowed:

>>> load_config_dict({"model": {"chanels": 8}})
Traceback (most recent call last):
ConfigError: unknown key 'model.chanels' (did you mean 'model_channels'?); allowed keys in 'model': ...
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

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


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return load_config_dict(raw)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


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
    _check_cross_fields(cfg)
    return cfg


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
            value = _coerce(raw[name], ftype, dotted)
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
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


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


def _check_cross_fields(cfg: ExperimentConfig) -> None:
    m, d = cfg.model, cfg.data
    if not m.channel_mult or any(c < 1 for c in m.channel_mult):
        raise ConfigError(f"'model.channel_mult' must be a non-empty list of positive integers, got {list(m.channel_mult)}")
    if m.out_channels != m.in_channels:
        raise ConfigError(
            f"'model.out_channels' ({m.out_channels}) must equal 'model.in_channels' ({m.in_channels}): "
            "the network predicts noise, velocity or x0 of the same shape as the image"
        )
    _check_autoencoder(cfg)
    size, what = (cfg.model_size, f"the latent side data.image_size / {cfg.latent_downsampling} = {cfg.model_size}") \
        if cfg.autoencoder.enabled else (d.image_size, f"data.image_size={d.image_size}")
    factor = 2 ** (len(m.channel_mult) - 1)
    if size % factor:
        raise ConfigError(
            f"{what} must be divisible by {factor}, since 'model.channel_mult' has {len(m.channel_mult)} levels"
        )
    sizes = [size // 2**i for i in range(len(m.channel_mult))]
    for r in m.attention_resolutions:
        if r not in sizes:
            raise ConfigError(
                f"'model.attention_resolutions' has {r}, which is no feature-map size of this model; "
                f"with {what} the sizes are {sizes}"
            )
    if cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError("'diffusion.beta_start' must be smaller than 'diffusion.beta_end'")
    s = cfg.sampler
    if s.num_inference_steps > cfg.diffusion.num_train_timesteps:
        raise ConfigError(
            f"'sampler.num_inference_steps' ({s.num_inference_steps}) exceeds "
            f"'diffusion.num_train_timesteps' ({cfg.diffusion.num_train_timesteps})"
        )
    if d.target_spacing and (len(d.target_spacing) != 3 or min(d.target_spacing) <= 0):
        raise ConfigError(f"'data.target_spacing' must be empty or three positive numbers (mm), got {list(d.target_spacing)}")
    if len(d.intensity_percentiles) != 2 or d.intensity_percentiles[0] >= d.intensity_percentiles[1]:
        raise ConfigError(f"'data.intensity_percentiles' must be [lower, upper] with lower < upper, got {list(d.intensity_percentiles)}")
    if cfg.train.device not in ("auto", "cpu", "cuda", "mps") and not cfg.train.device.startswith("cuda:"):
        raise ConfigError(f"'train.device' is {cfg.train.device!r}; use auto, cpu, cuda, cuda:N or mps")
    pc, fed = cfg.privacy, cfg.federation
    if pc.central_dp != "off" and fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"'privacy.central_dp' ({pc.central_dp}) needs federation.strategy fedavg or fedprox: its noise is "
                          f"calibrated to the sensitivity of an average of clipped updates, not of {fed.strategy}")


def _check_autoencoder(cfg: ExperimentConfig) -> None:
    ae, m = cfg.autoencoder, cfg.model
    if not ae.enabled:
        return
    if not ae.channels or any(c < 1 for c in ae.channels):
        raise ConfigError(f"'autoencoder.channels' must be a non-empty list of positive integers, got {list(ae.channels)}")
    bad = [c for c in ae.channels if c % ae.norm_groups]
    if bad:
        raise ConfigError(f"'autoencoder.norm_groups' ({ae.norm_groups}) must divide every width in 'autoencoder.channels'; "
                          f"it does not divide {bad}")
    if cfg.data.image_size % cfg.latent_downsampling:
        raise ConfigError(f"'data.image_size' ({cfg.data.image_size}) must be divisible by {cfg.latent_downsampling}, "
                          f"since 'autoencoder.channels' has {len(ae.channels)} levels")
    if m.in_channels != ae.latent_channels:
        raise ConfigError(f"'model.in_channels' ({m.in_channels}) must equal 'autoencoder.latent_channels' "
                          f"({ae.latent_channels}): with latent diffusion the UNet denoises latents")
    if ae.perceptual_weight > 0 and not ae.perceptual_weights:
        raise ConfigError("'autoencoder.perceptual_weight' > 0 needs 'autoencoder.perceptual_weights' (a domain encoder "
                          "file from `meddiff train-encoder`); nothing is ever downloaded")
    if ae.mode == "dp" and not cfg.privacy.enabled:
        raise ConfigError("'autoencoder.mode' is 'dp' but 'privacy.enabled' is false; for a run without DP set "
                          "autoencoder.mode=not_private (or public)")
    if ae.attention and ae.mode == "dp":
        raise ConfigError("'autoencoder.attention' cannot be used with autoencoder.mode=dp: MONAI's attention blocks fail on "
                          "the empty batches of Poisson sampling; set autoencoder.attention=false")
    if ae.mode == "public" and not ae.checkpoint and not (ae.public_path and ae.public_dataset):
        raise ConfigError("'autoencoder.mode' is 'public': set 'autoencoder.checkpoint' (a trained autoencoder), or "
                          "'autoencoder.public_dataset' and 'autoencoder.public_path' (public data to pre-train on)")
