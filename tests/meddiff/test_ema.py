import pytest
import torch

from meddiff.ema import EMA
from tests.conftest import tiny_unet


def test_ema_follows_the_closed_form():
    model = tiny_unet()
    ema = EMA(model, decay=0.5, warmup=False)
    p = next(model.parameters())
    start = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    ema.update(model)
    name = next(iter(dict(model.named_parameters())))
    torch.testing.assert_close(ema.shadow[name], start + 0.5)


def test_warmup_decay():
    ema = EMA(tiny_unet(), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999)


def test_load_state_dict_checks_keys():
    ema = EMA(tiny_unet(), decay=0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"nope": torch.zeros(1)})
