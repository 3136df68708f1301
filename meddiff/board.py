"""TensorBoard event files for a run (``<run>/tensorboard``), beside its CSV and PNG outputs.

Tags follow the MONAI / NVFlare habit of ``<scope>/<metric>``: ``global/train_loss``,
``site_0/epsilon``, ``samples/grid``. The step is the optimizer step of a centralized run or the
round of a federated one (``autoencoder/...`` tags for phase 1 of latent diffusion). ``tensorboard
--logdir runs/`` shows every run under it as it trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from meddiff.outputs import image_grid


class RunBoard:
    """A TensorBoard writer that is a no-op when disabled; non-finite values are skipped."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard); loaded only when used

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=10)

    def scalars(self, scope: str, values: Mapping[str, object], step: int) -> None:
        """Write every finite number of ``values`` as ``<scope>/<name>``."""
        if self.writer is None:
            return
        for name, value in values.items():
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                self.writer.add_scalar(f"{scope}/{name}", number, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of ``[N, C, *S]`` images in [-1, 1] (3-D volumes by their middle axial slice)."""
        if self.writer is None:
            return
        grid = image_grid(images)
        grid = grid[..., None] if grid.ndim == 2 else grid
        self.writer.add_image(tag, np.ascontiguousarray(grid), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from a run's event files (for tests and reports)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def image_tags(run_dir: str | Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return list(acc.Tags()["images"])

