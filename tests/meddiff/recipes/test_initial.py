"""Starting a run from a checkpoint (train.init_from): the weights arrive intact, a checkpoint of
another architecture is refused by name, and the run records where they came from."""

import json

import pytest
import torch

from configs import config_to_dict
from meddiff.checkpoint import load_checkpoint, save_checkpoint
from meddiff.recipes.build import build_unet
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.initial import RECORD_FILE, file_sha256, load_initial_weights, load_into
from meddiff.recipes.phases import AUTOENCODER, DIFFUSION
from tests.conftest import tiny_config


def _source(tmp_path, extra=()):
    """A checkpoint of random weights, with different EMA weights."""
    cfg = tiny_config(extra=list(extra))
    torch.manual_seed(7)
    model, ema = build_unet(cfg), build_unet(cfg)
    path = save_checkpoint(tmp_path / "pretrained.pt", model_state=model.state_dict(), ema_state=ema.state_dict(),
                           config=config_to_dict(cfg), step=10)
    return path, ema.state_dict()


def test_the_initial_weights_are_the_checkpoints_ema_weights(tmp_path):
    path, ema = _source(tmp_path)
    initial = load_initial_weights(tiny_config(extra=[f"train.init_from={path}"]))
    assert initial.sha256 == file_sha256(path) and initial.autoencoder is None
    model = build_unet(tiny_config())
    load_into(model, DIFFUSION.initial_state(initial), "test")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k], msg=k)
    assert AUTOENCODER.initial_state(initial) is None
    assert load_initial_weights(tiny_config()) is None


def test_another_architecture_is_refused_naming_the_keys(tmp_path):
    path, _ = _source(tmp_path)
    wider = tiny_config(extra=["model.model_channels=16", "model.norm_groups=4", f"train.init_from={path}"])
    with pytest.raises(ValueError, match=r"train.init_from: .*do not fit.*other shape \['conv_in.bias', 'conv_in.weight'"):
        load_into(build_unet(wider), load_initial_weights(wider).unet, f"train.init_from: {path}")
    with pytest.raises(FileNotFoundError, match="train.init_from: .*missing.pt does not exist"):
        load_initial_weights(tiny_config(extra=[f"train.init_from={tmp_path / 'missing.pt'}"]))


def test_a_centralized_run_starts_from_the_checkpoint_and_records_it(tmp_path):
    path, ema = _source(tmp_path)
    cfg = tiny_config(tmp_path, ["train.steps=1", "train.lr=1e-12", "train.grad_clip=0", "output.num_samples=2",
                                 f"train.init_from={path}"])
    run = train_centralized(cfg, progress=False)
    record = json.loads((run / RECORD_FILE).read_text())
    assert record["sha256"] == file_sha256(path) and "outside the sites' DP guarantee" in record["note"]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert json.loads(last.extra["init_from"])["sha256"] == record["sha256"]
    for k, v in last.model.items():  # one step at a vanishing learning rate: still the initial weights
        torch.testing.assert_close(v, ema[k], atol=1e-6, rtol=0, msg=k)


def test_a_plain_checkpoint_starts_a_low_rank_fine_tuning_with_fresh_adapters(tmp_path):
    from meddiff.nets.trainable import adapter_keys
    from meddiff.recipes.initial import start_from

    path, ema = _source(tmp_path)
    cfg = tiny_config(extra=[f"train.init_from={path}", "train.trainable=lora", "train.lora_rank=2"])
    model = build_unet(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert start_from(model, DIFFUSION, load_initial_weights(cfg))
    state = model.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert adapter_keys(model) and all(torch.equal(state[k], fresh[k]) for k in adapter_keys(model))
