import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from meddiff.diffusion import GaussianDiffusion, collapse_noise_multiplicity, make_noise_schedule
from meddiff.train import train_loop
from privacy.engine import make_private, per_image_gradients
from privacy.per_sample import per_example_gradients
from tests.conftest import tiny_unet, twin_unets


def _setup(n=6, k=1, noise=0.0, clip=1e6, seed=0, mode="hooks"):
    torch.manual_seed(seed)
    model = tiny_unet(num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    reference = tiny_unet(num_classes=2)
    reference.load_state_dict(model.state_dict())
    x0 = torch.randn(n, 1, 16, 16)
    y = torch.arange(n) % 2
    loader = DataLoader(TensorDataset(x0, y), batch_size=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = make_private(model, opt, loader, noise_multiplier=noise, max_grad_norm=clip, noise_multiplicity=k,
                           grad_sample_mode=mode)
    return private, reference, x0, y


def _reference_per_image(reference, diffusion, x0, y, k, seed):
    """One image at a time: the gradient of that image's mean loss over its K draws."""
    x_t, t, y_rows, target = diffusion.training_inputs(x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(seed))
    grads = []
    for i in range(len(x0)):
        rows = slice(i * k, (i + 1) * k)  # the image's own rows: its loss (weights, anatomy term) from them alone
        loss = diffusion.row_losses(reference(x_t[rows], t[rows], y_rows[rows]), x_t[rows], t[rows], target[rows]).mean()
        grads.append(torch.autograd.grad(loss, list(reference.parameters())))
    return [torch.stack(g) for g in zip(*grads)]  # per parameter: [N, *shape]


def _per_image(private, mode, diffusion, x0, y, k, gen):
    """Per-image gradients ``[N, ...]`` per parameter, as each mode computes them before clipping."""
    module = private.model._module
    if mode == "hooks":
        private.optimizer.zero_grad()
        diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=k, generator=gen).mean().backward()
        return [collapse_noise_multiplicity(p.grad_sample, k) for p in private.optimizer.params]
    if mode == "vmap":
        grads, _ = per_image_gradients(module, diffusion, x0, y, noise_multiplicity=k, generator=gen)
    else:
        grads, _ = per_example_gradients(
            module, lambda: diffusion.training_losses(module, x0, y=y, noise_multiplicity=k, generator=gen), len(x0))
    return [grads[name] for name, _ in module.named_parameters()]


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
@pytest.mark.parametrize("k", [1, 4])
def test_each_per_image_gradient_equals_one_image_at_a_time_autograd(k, mode):
    private, reference, x0, y = _setup(k=k, mode=mode)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v")
    expected = _reference_per_image(reference, diffusion, x0, y, k, seed=5)
    gen = torch.Generator().manual_seed(5)
    got = _per_image(private, mode, diffusion, x0, y, k, gen)
    for g, e in zip(got, expected):
        assert g.shape[0] == len(x0)  # one gradient per image, not per row
        rel = float((g - e).norm() / e.norm().clamp_min(1e-12))
        assert rel <= 1e-5, rel


@pytest.mark.parametrize("k", [1, 4])
def test_per_image_gradients_match_reference_before_clipping(k):
    private, reference, x0, y = _setup(k=k)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    private.optimizer.zero_grad()
    losses = diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(3))
    losses.mean().backward()
    private.optimizer.pre_step()  # collapse, clip (C huge), add no noise, scale by the expected batch
    # reference: sum over images of grad of each image's mean loss over its K draws, / expected batch size
    ref_losses = diffusion.training_losses(reference, x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(3))
    ref_grads = torch.autograd.grad(ref_losses.sum(), list(reference.parameters()))
    expected = private.optimizer.expected_batch_size
    for p, g in zip(private.optimizer.params, ref_grads):
        torch.testing.assert_close(p.grad, g / expected, rtol=1e-5, atol=1e-7)
    assert private.stats.total == len(x0)


def test_every_clipped_per_image_gradient_norm_is_at_most_c():
    c = 1e-3
    private, _, x0, y = _setup(n=1, k=2, clip=c)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    for i in range(3):  # one image per step: p.grad * expected batch size is that image's clipped gradient
        private.optimizer.zero_grad()
        diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=2, generator=torch.Generator().manual_seed(i)).mean().backward()
        private.optimizer.pre_step()
        norm = torch.stack([p.grad.norm() for p in private.optimizer.params]).norm() * private.optimizer.expected_batch_size
        assert norm <= c * (1 + 1e-4)
    assert private.stats.clip_fraction == 1.0


def test_added_noise_has_std_sigma_c_over_b():
    sigma, c = 1.3, 0.5
    private, _, x0, y = _setup(n=6, noise=sigma, clip=c)
    private.optimizer.zero_grad()
    p0 = private.optimizer.params[0]
    for p in private.optimizer.params:
        p.grad_sample = torch.zeros(6, *p.shape)  # zero gradients: what remains is the noise
    private.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in private.optimizer.params])
    expected = sigma * c / private.optimizer.expected_batch_size
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert abs(float(noise.mean())) < 3 * expected / noise.numel() ** 0.5


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
def test_empty_poisson_batch_steps_and_advances_the_accountant(mode):
    private, _, x0, y = _setup(n=6, noise=1.0, clip=1.0, mode=mode)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    loss = private.step_fn(private.model, diffusion, private.optimizer, x0[:0], y[:0])
    assert loss == 0.0
    sigma, q, steps = private.engine.accountant.history[-1]
    assert (sigma, steps) == (1.0, 1)  # the empty step is accounted for
    # and it still took a noisy step: every gradient is pure noise
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in private.optimizer.params)


def test_history_is_restored_and_weights_are_unwrapped():
    private, reference, _, _ = _setup()
    assert all(not k.startswith("_module.") for k in private.state_dict())
    assert set(private.state_dict()) == set(reference.state_dict())
    model = tiny_unet()
    loader = DataLoader(TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), batch_size=2)
    again = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0, max_grad_norm=1.0,
                         accountant_history=[(1.0, 0.5, 10)])
    assert again.history == [(1.0, 0.5, 10)]
    assert again.engine.get_epsilon(1e-5) > 0


def test_batch_memory_manager_counts_only_real_steps_and_accounts_each_logical_batch():
    torch.manual_seed(0)
    model = tiny_unet(num_classes=2)
    x0, y = torch.randn(40, 1, 16, 16), torch.arange(40) % 2
    loader = DataLoader(TensorDataset(x0, y), batch_size=20)  # logical batch 20 -> q = 0.5
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.01), loader, noise_multiplier=1.0,
                           max_grad_norm=1.0, noise_multiplicity=2)
    ema_updates = []
    result = train_loop(model=private.model, objective=GaussianDiffusion(make_noise_schedule("cosine", 100)),
                        optimizer=private.optimizer, batches=private.batches(max_physical_batch_size=4), steps=3,
                        device=torch.device("cpu"), noise_multiplicity=2, progress=False,
                        optimizer_stepped=private.optimizer_stepped, on_step=lambda i, loss: ema_updates.append(i))
    assert result.steps == 3 and ema_updates == [0, 1, 2]
    assert result.examples > 3 * 4  # several physical batches per logical one
    assert private.history == [(1.0, 0.5, 3)]


def test_per_sample_rows_must_match_the_last_forward():
    private, _, x0, y = _setup(n=4, k=2)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    private.optimizer.zero_grad()
    diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=2).mean().backward()  # 8 rows
    with torch.no_grad():  # e.g. a logging forward between backward and step
        private.model(x0[:1], torch.zeros(1, dtype=torch.long), y[:1])
    with pytest.raises(RuntimeError, match="refusing to clip"):
        private.optimizer.pre_step()


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_latent_unet_per_image_gradients_are_exact_under_dp(spatial_dims, mode):
    """Latent diffusion's UNet: multi-channel latents, 2-D and 3-D, K=2, against one image at a time."""
    torch.manual_seed(0)
    kw = dict(spatial_dims=spatial_dims, in_channels=3, out_channels=3, num_classes=2)
    model, reference = twin_unets(**kw)
    z0 = torch.randn(3, 3, *(8,) * spatial_dims)  # scaled latents
    y = torch.arange(3) % 2
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(z0, y), batch_size=3),
                           noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=2, grad_sample_mode=mode)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v")
    expected = _reference_per_image(reference, diffusion, z0, y, 2, seed=9)
    gen = torch.Generator().manual_seed(9)
    got = _per_image(private, mode, diffusion, z0, y, 2, gen)
    for g, e in zip(got, expected):
        assert g.shape[0] == 3
        assert float((g - e).norm() / e.norm().clamp_min(1e-12)) <= 1e-5


def test_book_keeping_refuses_layers_it_cannot_handle():
    from torch import nn

    from privacy.per_sample import check_supported

    check_supported(tiny_unet(num_classes=2))  # every parametrised layer is Conv, Linear, GroupNorm or Embedding
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\) holds parameters.*privacy.grad_sample_mode=hooks"):
        check_supported(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="explicit zero padding"):
        check_supported(nn.Conv2d(1, 4, 3, padding="same"))


def test_book_keeping_under_bf16_autocast_stays_close_to_fp32():
    """Mixed precision (bf16 on GPUs, also available on CPU): per-image gradients within bf16 accuracy."""
    torch.manual_seed(0)
    model = tiny_unet(num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v")
    x0, y = torch.randn(4, 1, 16, 16), torch.arange(4) % 2

    def grads(dtype):
        gen = torch.Generator().manual_seed(2)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            g, _ = per_example_gradients(model, lambda: diffusion.training_losses(model, x0, y=y, generator=gen), 4)
        return g

    full, half = grads(None), grads(torch.bfloat16)
    total = torch.cat([full[k].flatten() for k in full])
    diff = torch.cat([(half[k].float() - full[k]).flatten() for k in full])
    assert float(diff.norm() / total.norm()) < 0.05


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
@pytest.mark.parametrize("k, lesion_weight, anatomy, pooled", [(1, 1.0, False, False), (3, 1.0, False, False),
                                                                (3, 5.0, False, False), (2, 1.0, True, False),
                                                                (2, 5.0, False, True)])
def test_mask_conditioned_per_image_gradients_equal_one_image_at_a_time_autograd(k, lesion_weight, anatomy, pooled, mode):
    """Packed (image, mask) examples with per-example condition dropout, with and without the
    lesion-weighted loss and the anatomy constraint, and (``pooled``) as the latent variant packs
    them, with masks area-pooled to the grid: still one exact gradient per image."""
    from meddiff.diffusion import AnatomyConstraint, SpatialConditioning, condition_on_grid, mask_to_condition
    from meddiff.evaluate.segmentation import SegmenterSettings, build_segmenter

    torch.manual_seed(0)
    model = tiny_unet(num_classes=2, cond_channels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    reference = tiny_unet(num_classes=2, cond_channels=2)
    reference.load_state_dict(model.state_dict())
    n = 6
    side = 64 if pooled else 16  # pooled: the masks of 64-pixel images on a 16-cell latent grid, fractional
    masks = (torch.rand(n, 2, side, side) > torch.tensor([0.5, 0.9]).view(1, 2, 1, 1)).float()  # channel 1: sparse lesions
    cond = condition_on_grid(mask_to_condition(masks), (16, 16))
    x0, y = torch.cat([torch.randn(n, 1, 16, 16), cond], dim=1), torch.arange(n) % 2
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(x0, y), batch_size=n),
                           noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=k, grad_sample_mode=mode)
    objective = SpatialConditioning(GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v"),
                                    image_channels=1, cond_dropout=0.5, lesion_weight=lesion_weight, lesion_dilation=1)
    if anatomy:  # a frozen segmenter on every row's predicted x0 (max_t = T: no row is exempt)
        segmenter = build_segmenter(SegmenterSettings(out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0))
        objective.anatomy = AnatomyConstraint(segmenter, weight=2.0, max_t=100)
    x_in, _, _, _ = objective.training_inputs(x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(6))
    dropped = (x_in[::k, 1:] == 0).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < n  # both kinds of example are in the batch
    expected = _reference_per_image(reference, objective, x0, y, k, seed=6)
    got = _per_image(private, mode, objective, x0, y, k, torch.Generator().manual_seed(6))
    for g, e in zip(got, expected):
        assert g.shape[0] == n
        rel = float((g - e).norm() / e.norm().clamp_min(1e-12))
        assert rel <= 1e-5, rel
