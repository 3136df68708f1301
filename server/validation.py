"""Screening of site updates before aggregation: nothing a site sends can crash the server."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Optional[str]:
    """The reason an update is unusable, or None: key set, shape, dtype and finiteness."""
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        return f"wrong key set (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
    for k, ref in reference.items():
        a = update[k]
        if tuple(a.shape) != tuple(ref.shape):
            return f"'{k}' has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(ref.dtype, np.floating):
            if a.dtype.type not in FLOAT_DTYPES:
                return f"'{k}' has dtype {a.dtype}, expected a float type"
            if not np.isfinite(a).all():
                return f"'{k}' contains NaN or Inf"
        elif a.dtype != ref.dtype:
            return f"'{k}' has dtype {a.dtype}, expected {ref.dtype}"
    return None


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all floating tensors."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((update[k].astype(np.float64) - ref.astype(np.float64)) ** 2))
    return total**0.5


def screen_updates(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    *,
    norm_factor: float = 10.0,
) -> tuple[list[str], dict[str, str]]:
    """Split updates (by site label) into accepted labels and ``{label: reason}`` rejections.

    An update is rejected for a wrong key set, shape or dtype, for NaN/Inf, or when its distance
    from the current global model exceeds ``norm_factor`` times the round's median distance
    (checked once at least three updates pass the other tests).
    """
    rejected: dict[str, str] = {}
    passed = []
    for label, update in updates.items():
        reason = check_update(update, reference)
        if reason:
            rejected[label] = reason
        else:
            passed.append(label)
    if len(passed) >= 3 and norm_factor > 0:
        norms = {label: update_norm(updates[label], reference) for label in passed}
        median = float(np.median(list(norms.values())))
        for label in list(passed):
            if median > 0 and norms[label] > norm_factor * median:
                rejected[label] = f"update norm {norms[label]:.4g} exceeds {norm_factor:g}x the round median {median:.4g}"
                passed.remove(label)
    return passed, rejected
