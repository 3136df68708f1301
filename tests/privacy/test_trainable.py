"""Parameter-efficient DP fine-tuning: per-image gradients stay exact for each trainable-parameter
mode, a DP round changes and sends only the trainable tensors, and the server merges them."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from client.local import _loop_settings, local_train
from meddiff.train import train_loop
from meddiff.diffusion import GaussianDiffusion, collapse_noise_multiplicity, make_noise_schedule, row_mse
from meddiff.nets.trainable import TRAINABLE_MODES, adapter_keys, select_trainable, update_keys
from meddiff.recipes.build import build_unet
from meddiff.recipes.phases import DIFFUSION
from meddiff.recipes.sites import phantom_site
from privacy.calibration import enrol
from privacy.accounting import PrivacyLedger
from privacy.engine import make_private, per_image_gradients
from privacy.per_sample import per_example_gradients
from privacy.site import SitePrivacy
from server.phase import PhaseRun
from server.screening import aggregate, screen
from server.strategy import create_strategy
from tests.conftest import tiny_config, tiny_unet
from tests.flower_helpers import server_message, train_reply

PEFT_MODES = [m for m in TRAINABLE_MODES if m != "all"]


def _pair(mode: str, spatial_dims: int = 2):
    """A model in ``mode`` with every parameter randomised (adapters too), and an identical reference."""
    torch.manual_seed(0)
    model = select_trainable(tiny_unet(num_classes=2, spatial_dims=spatial_dims), mode, lora_rank=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    reference = select_trainable(tiny_unet(num_classes=2, spatial_dims=spatial_dims), mode, lora_rank=3)
    reference.load_state_dict(model.state_dict())
    return model, reference


def _reference(reference, diffusion, x0, y, k, seed):
    x_t, t, y_rows, target = diffusion.training_inputs(x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(seed))
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = []
    for i in range(len(x0)):
        rows = slice(i * k, (i + 1) * k)
        loss = row_mse(reference(x_t[rows], t[rows], y_rows[rows]), target[rows]).mean()
        grads.append(torch.autograd.grad(loss, params))
    return [torch.stack(g) for g in zip(*grads)]


@pytest.mark.parametrize("grad_mode", ["hooks", "vmap", "bk"])
@pytest.mark.parametrize("mode", PEFT_MODES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_image_gradients_of_the_trainable_parameters_equal_one_image_at_a_time_autograd(mode, grad_mode, spatial_dims):
    model, reference = _pair(mode, spatial_dims)
    assert not ModuleValidator.validate(model, strict=False)
    n, k = 3, 2
    x0, y = torch.randn(n, 1, *(8,) * spatial_dims), torch.arange(n) % 2
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(x0, y), batch_size=n),
                           noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=k, grad_sample_mode=grad_mode)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v")
    expected = _reference(reference, diffusion, x0, y, k, seed=3)
    gen, module = torch.Generator().manual_seed(3), private.model._module
    if grad_mode == "hooks":
        diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=k, generator=gen).mean().backward()
        got = [collapse_noise_multiplicity(p.grad_sample, k) for p in private.optimizer.params]
    else:
        grads, _ = (per_image_gradients(module, diffusion, x0, y, noise_multiplicity=k, generator=gen) if grad_mode == "vmap" else
                    per_example_gradients(module, lambda: diffusion.training_losses(module, x0, y=y, noise_multiplicity=k,
                                                                                    generator=gen), n))
        got = [grads[name] for name, p in module.named_parameters() if p.requires_grad]
    assert len(got) == len(expected) == len(update_keys(module))
    for g, e in zip(got, expected):
        assert g.shape[0] == n
        assert float((g - e).norm() / e.norm().clamp_min(1e-12)) <= 1e-5


@pytest.mark.parametrize("mode", PEFT_MODES)
def test_a_dp_round_changes_and_sends_only_the_trainable_tensors(mode, tmp_path):
    cfg = tiny_config(extra=[f"train.trainable={mode}", "train.lora_rank=2", "train.init_from=public.pt", "privacy.enabled=true", "federation.local_steps=2",
                             "federation.num_rounds=1", "data.num_samples=40", "model.num_classes=2", "train.lr=0.01"])
    torch.manual_seed(0)
    model = build_unet(cfg)
    with torch.no_grad():  # stands for pre-trained weights: from scratch, frozen zero layers block every gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = phantom_site(0, 1, cfg)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="site_0", delta=1e-3, budget=10.0)
    cal = enrol(ledger, study="s", num_examples=len(dataset), privacy_cfg=cfg.privacy, plan={"diffusion": (2, 8)})
    privacy = SitePrivacy(cfg, ledger, cal, lambda text: None)
    state, metrics = local_train(cfg, global_state, dataset, server_round=1, site_index=0, privacy=privacy)
    trainable = update_keys(model)
    assert sorted(state) == sorted(trainable) and len(trainable) < len(global_state)
    assert metrics["epsilon"] > 0
    assert any(not torch.equal(state[k], global_state[k]) for k in trainable), "no trainable tensor moved"

    # the same DP round step by step: every frozen tensor is bit-identical afterwards
    optimizer = DIFFUSION.build_optimizer(cfg, model.parameters())
    dp = privacy.wrap(DIFFUSION, model, optimizer, dataset, torch.device("cpu"))
    loop = _loop_settings(cfg, DIFFUSION, optimizer, 1, 0, 0, torch.device("cpu"), False, None)
    batches = dp.batches(4)
    train_loop(model=dp.model, optimizer=dp.optimizer, batches=batches, step_fn=dp.step_fn,
               optimizer_stepped=dp.optimizer_stepped, **loop)
    batches.close()
    after = dp.state_dict()
    assert all(torch.equal(after[k], global_state[k]) for k in global_state if k not in trainable)
    assert any(not torch.equal(after[k], global_state[k]) for k in trainable)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedmedian"])
def test_the_server_merges_partial_updates_into_the_global_model(strategy):
    cfg = tiny_config(extra=["train.trainable=attention", "train.init_from=public.pt", "federation.min_train_nodes=2", f"federation.strategy={strategy}"])
    torch.manual_seed(0)
    model = build_unet(cfg)
    run = PhaseRun(phase=None, model=model, ema=None, strategy=create_strategy(cfg.federation), global_state=model.state_dict(),
                   sample_model=None)
    keys = run.update_keys
    assert keys == update_keys(model) and 0 < len(keys) < len(run.global_state)
    updates = [({k: run.global_state[k] + (i + 1.0) for k in keys}, 10 * (i + 1)) for i in range(2)]
    replies = []
    for i, (state, n) in enumerate(updates):
        msg = server_message(cfg, run.global_state, dst=100 + i)
        replies.append(train_reply(msg, state, {"num-examples": n, "train_loss": 0.5, "steps": 1, "site-index": i, "seconds": 0.1}))
    current = {k: v.numpy() for k, v in run.global_state.items()}
    run.strategy.configure_train(1, ArrayRecord(run.global_state), ConfigRecord(), _NoGrid())  # FedOpt keeps the global arrays
    wrong = train_reply(server_message(cfg, run.global_state, dst=102), dict(run.global_state),
                        {"num-examples": 5, "train_loss": 0.5, "steps": 1, "site-index": 2, "seconds": 0.1})
    screened = screen(1, replies + [wrong], {k: current[k] for k in keys}, norm_factor=10,
                      frozen={k: v for k, v in current.items() if k not in keys})
    assert [r["accepted"] for r in screened.report] == [True, True, False]  # a whole model is the wrong key set
    merged = run.merged({k: torch.from_numpy(np.asarray(v.numpy())) for k, v in aggregate(run.strategy, 1, screened, min_valid=2).items()})
    for k, v in run.global_state.items():
        if k not in keys:
            assert torch.equal(merged[k], v), k  # frozen: exactly the global tensor
    if strategy == "fedavg":
        for k in keys:
            torch.testing.assert_close(merged[k], run.global_state[k] + (1.0 * 10 + 2.0 * 20) / 30)


class _NoGrid:
    """What ``configure_train`` asks of a grid: the connected nodes."""

    def get_node_ids(self):
        return [100, 101, 102]


def test_low_rank_adapters_start_as_the_plain_layer_and_keep_its_keys():
    torch.manual_seed(0)
    plain = tiny_unet(num_classes=2)
    adapted = select_trainable(tiny_unet(num_classes=2), "lora", lora_rank=2)
    assert set(plain.state_dict()) == set(adapted.state_dict()) - set(adapter_keys(adapted))
    adapted.load_state_dict({**adapted.state_dict(), **plain.state_dict()})
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 50]), torch.tensor([0, 1])
    torch.testing.assert_close(adapted(x, t, y), plain(x, t, y))  # up-projections start at zero
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("low_rank.up.weight") for n in trainable)


def test_an_impossible_mode_or_rank_is_refused():
    with pytest.raises(ValueError, match="train.trainable='nope'"):
        select_trainable(tiny_unet(), "nope")
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        select_trainable(tiny_unet(), "lora", lora_rank=0)
