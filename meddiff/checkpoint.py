"""Checkpoints that carry their config, step and version, and never pickle code.

A checkpoint is a plain dict saved with ``torch.save``: tensors, numbers, strings, lists and dicts
only, so it loads with ``torch.load(weights_only=True)``. Loading rebuilds the model from the stored
config. Writes are atomic (temporary file, then ``os.replace``), so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

import meddiff

CHECKPOINT_FORMAT = "meddiff-checkpoint/1"

@dataclass
class Checkpoint:
    """The contents of a checkpoint file."""

    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    step: int
    version: str
    ema: Optional[dict[str, torch.Tensor]] = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    *,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    step: int,
    ema_state: Optional[Mapping[str, torch.Tensor]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Atomically write a checkpoint. ``config`` is the plain-data experiment config."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": meddiff.__version__,
        "config": dict(config),
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "ema": None if ema_state is None else {k: v.detach().cpu() for k, v in ema_state.items()},
        "extra": dict(extra or {}),
    }
    return _atomic_torch_save(path, payload)


def _atomic_torch_save(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_state_file(path: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Atomically write a bare state dict (a plain model's, never a DP wrapper's)."""
    return _atomic_torch_save(Path(path), {k: v.detach().cpu() for k, v in state.items()})


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_state_file` (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename): a crash leaves the old
    file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with ``weights_only=True``; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise ValueError(f"{path}: not a readable meddiff checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a meddiff checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("config", "model", "step", "version") if k not in payload]
    if missing:
        raise ValueError(f"{path}: a damaged meddiff checkpoint: it lacks {missing}")
    if not isinstance(payload["config"], dict) or not isinstance(payload["model"], dict):
        raise ValueError(f"{path}: a damaged meddiff checkpoint: 'config' and 'model' must be mappings")
    if _version_tuple(payload["version"]) > _version_tuple(meddiff.__version__):
        raise ValueError(f"{path}: written by meddiff {payload['version']}, newer than this installation "
                         f"({meddiff.__version__}); upgrade meddiff-fl to read it")
    return Checkpoint(
        config=payload["config"],
        model=payload["model"],
        step=payload["step"],
        version=payload["version"],
        ema=payload.get("ema"),
        extra=payload.get("extra") or {},
    )


def _version_tuple(version: Any) -> tuple[int, ...]:
    parts = []
    for p in str(version).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the tensor if any floating weight is NaN or Inf."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{source}: weight {key!r} contains NaN or Inf; this model cannot be used "
                             "(the training that produced it diverged)")
