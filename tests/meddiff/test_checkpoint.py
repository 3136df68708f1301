import pickle

import pytest
import torch

from configs import config_to_dict
from meddiff.recipes.build import build_unet_from_section
from meddiff.recipes.restore import model_from_checkpoint
from meddiff.checkpoint import load_checkpoint, save_checkpoint
from meddiff.ema import EMA
from tests.conftest import tiny_config


def _trained_model(cfg):
    torch.manual_seed(0)
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny_config(extra=["model.num_classes=2"])
    model = _trained_model(cfg)
    ema = EMA(model, decay=0.9)
    path = save_checkpoint(tmp_path / "c.pt", model_state=model.state_dict(), ema_state=ema.state_dict(),
                           config=config_to_dict(cfg), step=7)
    loaded, loaded_cfg, ckpt = model_from_checkpoint(path, use_ema=False)
    assert loaded_cfg == cfg and ckpt.step == 7 and ckpt.version
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
        ema_model, _, _ = model_from_checkpoint(path, use_ema=True)
        assert torch.equal(model(x, t, y), ema_model(x, t, y))  # fresh EMA equals the weights


def test_checkpoint_is_plain_data_loadable_with_weights_only(tmp_path):
    cfg = tiny_config()
    model = _trained_model(cfg)
    path = save_checkpoint(tmp_path / "c.pt", model_state=model.state_dict(), config=config_to_dict(cfg), step=1)
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["model"]["model_channels"] == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "meddiff-checkpoint/1", "x": Evil()}, fh)
    with pytest.raises(ValueError, match="evil.pt: not a readable meddiff checkpoint"):
        load_checkpoint(path)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    trunc = tmp_path / "trunc.pt"
    cfg = tiny_config()
    save_checkpoint(trunc, model_state=_trained_model(cfg).state_dict(), config=config_to_dict(cfg), step=1)
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.pt"):
        load_checkpoint(trunc)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt: not a meddiff checkpoint"):
        load_checkpoint(foreign)
    mismatch = tmp_path / "mismatch.pt"
    other = tiny_config(extra=["model.model_channels=16"])
    save_checkpoint(mismatch, model_state=_trained_model(cfg).state_dict(), config=config_to_dict(other), step=1)
    with pytest.raises(ValueError, match="do not fit the model"):
        model_from_checkpoint(mismatch)


def test_damaged_newer_and_nan_checkpoints_are_refused_naming_the_file(tmp_path):
    cfg = tiny_config()
    model = _trained_model(cfg)
    good = save_checkpoint(tmp_path / "good.pt", model_state=model.state_dict(), config=config_to_dict(cfg), step=1)
    payload = torch.load(good, weights_only=True)
    del payload["config"]
    torch.save(payload, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match=r"noconfig.pt: a damaged meddiff checkpoint: it lacks \['config'\]"):
        load_checkpoint(tmp_path / "noconfig.pt")
    payload = torch.load(good, weights_only=True)
    payload["version"] = "999"
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt: written by meddiff 999, newer than this installation"):
        load_checkpoint(tmp_path / "future.pt")
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    nan = save_checkpoint(tmp_path / "nan.pt", model_state=state, config=config_to_dict(cfg), step=1)
    with pytest.raises(ValueError, match=f"nan.pt: weight '{key}' contains NaN or Inf"):
        model_from_checkpoint(nan, use_ema=False)
