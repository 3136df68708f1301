"""Shared fixtures: tiny configs (1 channel, 16x16, channels (8, 16)) and paths to shared data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_OVERRIDES = [
    "data.image_size=16",
    "data.num_samples=64",
    "model.model_channels=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "model.num_head_channels=8",
    "model.num_res_blocks=1",
    "model.norm_groups=4",
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=2",
    "sampler.num_inference_steps=3",
    "output.num_samples=4",
    "output.checkpoint_every=2",
]


def tiny_config(tmp_path: Path | None = None, extra: list[str] | tuple[str, ...] = ()):
    from configs import load_config

    overrides = list(TINY_OVERRIDES)
    if tmp_path is not None:
        overrides += [f"output.root={tmp_path}", "output.name=run"]
    return load_config(None, overrides + list(extra))


def tiny_unet(**kwargs):
    from meddiff.nets import ADMUNet

    args = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_head_channels=8, norm_groups=4)
    args.update(kwargs)
    return ADMUNet(**args)


def twin_unets(**kwargs):
    """``(model, reference)``: two tiny UNets with the same weights, drawn N(0, 0.05) so that no
    output is trivially zero; the reference computes one example at a time."""
    import torch

    model, reference = tiny_unet(**kwargs), tiny_unet(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    reference.load_state_dict(model.state_dict())
    return model, reference


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (expected beside the repo in ../shared/data)")
    return path


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Relative outputs (runs/, .cache/) go to a temporary folder, never into the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def short_tmp():
    """A temporary directory private to one test and short enough for Ray's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="mdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
