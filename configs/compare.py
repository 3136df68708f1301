"""Which config fields differ between two experiments, and which of them a resumed run may change."""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.schema import ExperimentConfig

#: Fields a run may change when it resumes from a checkpoint: how long it runs, where it writes,
#: how it evaluates, samples and uses the machine. Everything else defines the study.
RESUMABLE = ("federation.num_rounds", "autoencoder.num_rounds", "federation.round_timeout",
             "federation.max_failed_rounds", "output.", "evaluation.", "sampler.", "simulation.", "train.device",
             "train.threads", "train.num_workers", "train.log_every",
             "train.init_from", "pretraining.")  # a resume starts from its checkpoint, not from initial weights


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dataclasses."""
    out: list[str] = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(x):
            out += config_differences(x, y, prefix=f"{name}.")
        elif x != y:
            out.append(name)
    return out


def resume_conflicts(stored: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """``"field: stored -> new"`` for every difference a resumed run may not make."""
    conflicts = []
    for name in config_differences(stored, new):
        if any(name == r or (r.endswith(".") and name.startswith(r)) for r in RESUMABLE):
            continue
        conflicts.append(f"{name}: {_get(stored, name)!r} -> {_get(new, name)!r}")
    return conflicts


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
