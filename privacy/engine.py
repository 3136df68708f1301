"""Opacus DP-SGD around a plain training loop, with sound noise multiplicity.

``make_private`` wraps ``(model, optimizer, loader)`` with Opacus ``PrivacyEngine(accountant="rdp")``
in ``hooks`` mode and Poisson sampling, on a restored accountant history, so the same plain
training loop runs with and without DP.

Noise multiplicity (Dockhorn et al. 2022, arXiv 2210.09929, Sec. 3.2): the diffusion loss expands
each image to K rows with ``repeat_interleave``. Opacus computes one gradient per *row*; before it
clips, :func:`make_private` averages them back to one gradient per *image*
(:func:`meddiff.diffusion.collapse_noise_multiplicity`), so each image contributes exactly one
clipped gradient and the accountant's epsilon is correct. At the patient unit the records of one
patient are averaged once more, to one clipped gradient per patient, and patients are
Poisson-sampled instead of records (user-level DP-SGD, :mod:`privacy.patients`). Both are
hand-written (:mod:`privacy.clipping`, an instance hook on the ``DPOptimizer``) because Opacus has
no notion of several rows or records per privacy unit.

Three per-sample-gradient modes, all validated against one-image-at-a-time autograd:

- ``bk`` (the default): Opacus clips, adds noise and accounts, while :func:`bk_train_step`
  computes per-image gradients by book-keeping (:mod:`privacy.per_sample`): one batched backward
  for the activations only, then each layer's per-image weight gradient from its input and output
  gradient. The fastest mode and the lightest after ``hooks``; works for any objective (the
  diffusion loss, the autoencoder's).
- ``hooks``: Opacus's backward hooks on every layer (``train_step`` unchanged);
- ``vmap``: like ``bk``, but :func:`vmap_train_step` computes per-image gradients with
  ``torch.func.vmap(grad(...))`` over the whole model, one image (its K rows) per vmapped call
  (diffusion loss only).

``bk`` and ``vmap`` yield per-*image* gradients directly, with nothing to collapse; both run
Opacus in its ``no_op`` mode, which leaves per-sample gradients to the caller.

Opacus is imported when a model is made private, not with this module: importing it costs about
2 s per process (it pulls in ``torch.distributed`` and ``scipy.stats``), which every Flower
process of a run without DP would otherwise pay.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from meddiff.diffusion import GaussianDiffusion
from meddiff.train import train_step
from privacy.clipping import ClipStats, install_unit_clipping
from privacy.patients import PatientSampler, patient_batches
from privacy.per_sample import check_supported, per_example_gradients
from privacy.wrapping import expose_attributes, unwrap, unwrap_state

if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizer

GRAD_SAMPLE_MODES = ("hooks", "vmap", "bk")

# Said once in the privacy report instead of every round: the noise comes from torch's PRNG seeded
# from the OS entropy pool (Opacus's secure_mode needs torchcsprng, which is not installed).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Opacus's hooks see the first layer's input, which needs no gradient; PyTorch says so on every step.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


@dataclass
class PrivateTraining:
    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    stats: ClipStats
    grad_sample_mode: str = "hooks"
    patients: Optional[PatientSampler] = None  # user-level sampling at the patient unit; None: records

    @property
    def step_fn(self) -> Callable[..., float]:
        """The training step for this mode (``meddiff.train.train_step`` signature)."""
        return {"vmap": vmap_train_step, "bk": bk_train_step}.get(self.grad_sample_mode, train_step)

    def optimizer_stepped(self) -> bool:
        """Whether the last ``optimizer.step()`` really stepped (not one physical batch of a logical one)."""
        return not self.optimizer._is_last_step_skipped

    def batches(self, max_physical_batch_size: int) -> Iterator:
        """Poisson batches forever (a fresh Poisson draw each pass), split by Opacus's
        ``BatchMemoryManager`` into physical batches of at most ``max_physical_batch_size``;
        empty logical batches are yielded too, and still step. At the patient unit, patients are
        Poisson-sampled and split at patient boundaries (:func:`privacy.patients.patient_batches`;
        the sampler holds the physical batch size)."""
        if self.patients is not None:
            yield from patient_batches(self.loader, self.patients, self.optimizer, self.stats)
            return
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=max_physical_batch_size,
                                optimizer=self.optimizer) as loader:
            while True:
                yield from loader

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's weights (no ``_module.`` prefix): what may cross a boundary."""
        return {k: v.detach().cpu() for k, v in unwrap_state(self.model.state_dict()).items()}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return [tuple(h) for h in self.engine.accountant.history]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_multiplicity: int = 1,
    accountant_history: Sequence[tuple[float, float, int]] = (),
    grad_sample_mode: str = "hooks",
    noise_generator: Optional[torch.Generator] = None,
    patients: Optional[PatientSampler] = None,
) -> PrivateTraining:
    """Wrap for DP-SGD with Poisson sampling on a restored RDP accountant.

    Args:
        noise_multiplier: sigma, calibrated once for the site's whole study (never per round).
        max_grad_norm: clipping norm C of each unit's gradient (a record's, or a patient's).
        noise_multiplicity: K rows per image in the loss (collapsed before clipping).
        accountant_history: the site's ledger so far; the new steps are appended to it.
        grad_sample_mode: ``bk`` (train with :func:`bk_train_step`), ``hooks`` (with
            :func:`meddiff.train.train_step`) or ``vmap`` (with :func:`vmap_train_step`);
            ``PrivateTraining.step_fn`` picks the right one.
        noise_generator: source of the DP noise; pass an unpredictable one (the server knows
            the experiment seed).
        patients: user-level sampling (the patient unit): ``loader`` then only supplies the
            dataset, its collate function and workers; batches come from the sampler, the noisy
            sum is divided by the expected patients ``q * P`` and the accountant steps at the
            patient-level ``q``. None: Opacus's record-level Poisson sampling.
    Returns:
        The wrapped model, optimizer and (Poisson) loader, the engine and clipping statistics.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode {grad_sample_mode!r} is not supported; choose one of {GRAD_SAMPLE_MODES}")
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, {max_grad_norm}")
    if grad_sample_mode == "bk":
        check_supported(model)
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in accountant_history]
    private_model, private_opt, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=patients is None, noise_generator=noise_generator,
        grad_sample_mode="hooks" if grad_sample_mode == "hooks" else "no_op",  # Opacus no_op: gradients supplied by us
    )
    expose_attributes(private_model, model)
    if patients is not None:  # Opacus took the loader's record rate; the patient-level rate replaces it
        patients.attach(engine, private_opt, private_model if grad_sample_mode == "hooks" else None)
    elif loader.num_workers:  # BatchMemoryManager's skip signal assumes batches are fetched when sampled
        private_loader = DataLoader(private_loader.dataset, batch_sampler=private_loader.batch_sampler,
                                    collate_fn=private_loader.collate_fn, generator=private_loader.generator)
    stats = ClipStats()
    if grad_sample_mode == "hooks":
        private_model.register_forward_pre_hook(lambda _module, args: setattr(stats, "rows", args[0].shape[0]))
    # vmap and book-keeping give per-image gradients already; hooks give per-row ones that must be collapsed
    install_unit_clipping(private_opt, noise_multiplicity if grad_sample_mode == "hooks" else 1, stats)
    return PrivateTraining(private_model, private_opt, private_loader, engine, stats, grad_sample_mode, patients)


def per_image_gradients(
    module: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    noise_multiplicity: int = 1,
    generator: Optional[torch.Generator] = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-image gradients of each image's loss (its mean over K draws), by ``vmap`` over images.

    The (t, noise) draws are those of ``diffusion.training_losses`` with the same generator, and
    each row's loss is the objective's own (``diffusion.row_losses``: lesion weights, anatomy term).
    Shapes: ``x0 [N, C, *S]``, ``y [N]``; returns ``({name: [N, *param.shape]}, losses [N])``.
    """
    k, n = int(noise_multiplicity), x0.shape[0]
    x_t, t, y_rows, target = diffusion.training_inputs(x0, y=y, noise_multiplicity=k, generator=generator)
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())
    if n == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}, x0.new_zeros(0)

    def image_loss(p, x_t, t, target, extra):  # one image: its K rows (extra: its labels)
        y = extra.get("y")
        args = (x_t, t) if y is None else (x_t, t, y)
        return diffusion.row_losses(functional_call(module, (p, buffers), args), x_t, t, target).mean()

    group = lambda a: a.reshape(n, k, *a.shape[1:])  # noqa: E731
    extra = {"y": group(y_rows)} if y_rows is not None else {}
    args = [params, group(x_t), group(t), group(target), extra]
    in_dims = (None,) + (0,) * (len(args) - 1)
    with sdpa_kernel(SDPBackend.MATH):  # composite attention math, which vmap batches (the fused CPU kernel it loops over)
        grads, losses = vmap(grad_and_value(image_loss), in_dims=in_dims, randomness="error")(*args)
    return grads, losses


PerImageGradients = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


def supplied_gradient_step(per_image: PerImageGradients) -> Callable[..., float]:
    """A training step with :func:`meddiff.train.train_step`'s signature for Opacus ``no_op`` mode:
    ``per_image(module, objective, x0, y, noise_multiplicity, generator) -> (gradients [N, ...] by
    name, losses [N])`` computes the per-image gradients, then Opacus clips, adds noise and
    accounts. ``grad_clip`` must be 0 (DP clips per image)."""

    def step(model: nn.Module, objective, optimizer: DPOptimizer, x0: torch.Tensor, y: Optional[torch.Tensor] = None, *,
             noise_multiplicity: int = 1, grad_clip: float = 0.0,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             generator: Optional[torch.Generator] = None) -> float:
        if grad_clip:
            raise ValueError("grad_clip is replaced by per-image clipping (privacy.max_grad_norm) under DP")
        module = unwrap(model)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            grads, losses = per_image(module, objective, x0, y, noise_multiplicity, generator)
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name].to(p.dtype)
        optimizer.step()
        return float(losses.sum()) / max(len(losses), 1)

    return step


#: ``vmap`` mode: per-image gradients by ``vmap`` (the diffusion loss only).
vmap_train_step = supplied_gradient_step(
    lambda module, diffusion, x0, y, k, gen: per_image_gradients(module, diffusion, x0, y, noise_multiplicity=k, generator=gen))

#: ``bk`` mode: per-image gradients by book-keeping (:mod:`privacy.per_sample`) for any objective
#: with ``training_losses`` (the diffusion loss, or latent diffusion's autoencoder).
bk_train_step = supplied_gradient_step(
    lambda module, objective, x0, y, k, gen: per_example_gradients(
        module, lambda: objective.training_losses(module, x0, y=y, noise_multiplicity=k, generator=gen), x0.shape[0]))
