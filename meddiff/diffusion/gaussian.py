"""The Gaussian diffusion process: forward noising, parameterisation conversions and the loss.

Notation follows Ho et al. 2020 (DDPM): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``;
``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` (eq. 4). The velocity is
``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0`` (Salimans & Ho 2022, Sec. 4).

The process takes the network as an argument and never owns it.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

PREDICTION_TYPES = ("eps", "v", "x0")

Denoiser = Callable[..., torch.Tensor]


def collapse_noise_multiplicity(rows: torch.Tensor, noise_multiplicity: int) -> torch.Tensor:
    """Average ``[N*K, ...]`` per-row quantities to ``[N, ...]`` per-example ones.

    Rows ``n*K .. n*K+K-1`` belong to example ``n`` (the layout of ``repeat_interleave``). This is
    the collapse DP-SGD needs before clipping (Dockhorn et al. 2022, "Differentially Private
    Diffusion Models", arXiv 2210.09929, Sec. 3.2): each example must contribute exactly one
    gradient.
    """
    k = int(noise_multiplicity)
    if k < 1:
        raise ValueError(f"noise_multiplicity must be >= 1, got {k}")
    if rows.shape[0] % k:
        raise ValueError(f"first dimension {rows.shape[0]} is not a multiple of noise_multiplicity {k}")
    if k == 1:
        return rows
    return rows.reshape(rows.shape[0] // k, k, *rows.shape[1:]).mean(dim=1)


class GaussianDiffusion:
    """Forward process ``q(x_t | x0)``, eps/x0/v conversions and the per-example training loss.

    Args:
        betas: ``[T]`` noise schedule (float64 recommended).
        prediction_type: what the network outputs: ``"eps"``, ``"v"`` or ``"x0"``.
    """

    def __init__(self, betas: np.ndarray, *, prediction_type: str = "eps"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(betas)
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # float64 [T]
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` (float64 lookup) cast to ``like``'s dtype and broadcastable to it."""
        t = torch.as_tensor(t).to("cpu", torch.long)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        vals = table[t].to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
        return vals.reshape(vals.shape[0], *([1] * (like.ndim - 1)))

    # ---- forward process -----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x0)`` (Ho et al. 2020, eq. 4). Shapes: ``x0, noise [N, C, *S]``; ``t [N]``."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    # ---- parameterisations ---------------------------------------------------------------------
    def x0_from_eps(self, x_t, t, eps):
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(self.sqrt_alphas_cumprod, t, x_t)

    def eps_from_x0(self, x_t, t, x0):
        return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_from_x0_eps(self, x0, t, eps):
        return self._at(self.sqrt_alphas_cumprod, t, x0) * eps - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, x_t, t, v):
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def eps_from_v(self, x_t, t, v):
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * v + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def split_model_output(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Return ``(pred_x0, pred_eps)`` from the network output of this process's prediction type."""
        if self.prediction_type == "eps":
            return self.x0_from_eps(x_t, t, model_output), model_output
        if self.prediction_type == "v":
            return self.x0_from_v(x_t, t, model_output), self.eps_from_v(x_t, t, model_output)
        return model_output, self.eps_from_x0(x_t, t, model_output)

    def model_output_from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output (of this prediction type) that corresponds to ``eps`` at ``(x_t, t)``."""
        if self.prediction_type == "eps":
            return eps
        x0 = self.x0_from_eps(x_t, t, eps)
        if self.prediction_type == "v":
            return self.v_from_x0_eps(x0, t, eps)
        return x0

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "v":
            return self.v_from_x0_eps(x0, t, noise)
        return x0

    # ---- loss ----------------------------------------------------------------------------------
    def training_losses(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        *,
        y: Optional[torch.Tensor] = None,
        noise_multiplicity: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Per-example simple loss ``L_simple`` (Ho et al. 2020, eq. 14) averaged over K draws.

        Each example is expanded to ``K = noise_multiplicity`` rows with ``repeat_interleave``, each
        with its own ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` (Dockhorn et al. 2022, eq. 6). The
        network runs once on all ``N*K`` rows, so a per-sample-gradient engine sees ``N*K`` rows that
        :func:`collapse_noise_multiplicity` maps back to ``N``.

        Args:
            model: ``model(x_t [N*K, C, *S], t [N*K], y [N*K] | None) -> [N*K, C, *S]``.
            x0: ``[N, C, *S]`` clean images in [-1, 1].
            y: ``[N]`` labels or None.
        Returns:
            ``[N]`` float32 loss, the mean over each example's K draws of the per-row MSE.
        """
        x_t, t, y_rows, target = self.training_inputs(x0, y=y, noise_multiplicity=noise_multiplicity, generator=generator)
        out = model(x_t, t, y_rows) if y_rows is not None else model(x_t, t)
        return collapse_noise_multiplicity(self.row_losses(out, x_t, t, target), noise_multiplicity)

    def training_inputs(
        self,
        x0: torch.Tensor,
        *,
        y: Optional[torch.Tensor] = None,
        noise_multiplicity: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """The network inputs and regression target of :meth:`training_losses`.

        Returns ``(x_t [N*K, C, *S], t [N*K], y_rows [N*K] | None, target [N*K, C, *S])``, rows
        grouped by example (``repeat_interleave``); ``t`` is drawn before the noise, always.
        """
        k = int(noise_multiplicity)
        n = x0.shape[0]
        rows = x0.repeat_interleave(k, dim=0) if k > 1 else x0
        y_rows = y.repeat_interleave(k, dim=0) if (y is not None and k > 1) else y
        t = torch.randint(0, self.num_train_timesteps, (n * k,), generator=generator, device=_gen_device(generator, x0))
        noise = torch.randn(rows.shape, generator=generator, device=_gen_device(generator, x0), dtype=rows.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        return self.q_sample(rows, t, noise), t, y_rows, self.training_target(rows, t, noise)

    def loss_weights(self, x_in: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-pixel weights of the regression for the network input ``x_in`` of
        :meth:`training_inputs`: None, every pixel counts the same (``L_simple``)."""
        return None

    def row_losses(self, out: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each row ``[R]`` from the network output ``out``, its input ``x_in``, ``t [R]``
        and the regression target (:meth:`training_inputs`): the (weighted) per-row MSE."""
        return row_mse(out, target, self.loss_weights(x_in))


def row_mse(out: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row mean squared error in float32: ``[R, C, *S] -> [R]`` (R = 0 works).

    ``weight`` (``[R, 1, *S]``, broadcast over channels) weights each pixel's squared error
    before the mean; None is the plain mean, computed exactly as without weights.
    """
    sq = (out.float() - target.float()).pow(2)
    return (sq if weight is None else sq * weight.float()).flatten(1).mean(1)


def _gen_device(generator: Optional[torch.Generator], like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device
