"""The frozen first stage of latent diffusion: encoding images to scaled latents and back.

Latent diffusion (Rombach et al. 2022, arXiv 2112.10752, Sec. 3 and 4.3.2) trains the denoiser on
``z = s * mu(x)``, where ``s`` is the *scale factor* ``1 / std(mu)`` estimated on the training data
so that latents have roughly unit variance (the diffusion's noise schedule assumes it). Sampling
decodes ``decoder(z / s)``.

:class:`LatentStats` are mergeable sufficient statistics (count, sum, sum of squares), so a
federated run estimates ``s`` from every site's data without pooling it: each site sends its
statistics, the server adds them.

Mask-conditioned examples arrive *packed* (``cat([image, cond])``, :class:`meddiff.data.PackedMasks`):
the autoencoder encodes only the leading image channels, never the mask, and the condition is
area-pooled onto the latent grid (:func:`meddiff.diffusion.condition_on_grid`), so a latent
example is ``cat([s * mu(image), pool(cond)])`` and the spatially conditioned objective splits it
as it splits a pixel-space one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from meddiff.checkpoint import check_finite
from meddiff.diffusion.conditioning import condition_on_grid
from meddiff.nets.autoencoder import KLAutoencoder

CODEC_FORMAT = "meddiff-autoencoder/1"


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's keys, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LatentStats:
    """Count, sum and sum of squares of latent elements (float64): mergeable across sites."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        self.count += z.numel()
        self.total += float(z.sum())
        self.total_sq += float(z.pow(2).sum())

    def merge(self, other: "LatentStats") -> "LatentStats":
        return LatentStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def std(self) -> float:
        if self.count < 2:
            raise ValueError("latent statistics of fewer than 2 elements cannot give a scale factor")
        mean = self.total / self.count
        return math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))

    def scale_factor(self) -> float:
        """``1 / std`` (Rombach et al. 2022, Sec. 4.3.2, "rescaling" of the latent space)."""
        std = self.std
        if not std > 1e-8:
            raise ValueError(f"the latents have standard deviation {std:g}; the autoencoder has collapsed")
        return 1.0 / std


@torch.no_grad()
def latent_stats(autoencoder: KLAutoencoder, dataset: Dataset, *, batch_size: int = 32, max_examples: Optional[int] = None,
                 device: torch.device | str = "cpu") -> LatentStats:
    """Statistics of ``mu(x)`` over (up to ``max_examples`` of) ``dataset`` (of its image channels
    when its examples are packed with a condition)."""
    autoencoder = autoencoder.to(device).eval()
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    stats = LatentStats()
    for x, _ in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size):
        mu, _ = autoencoder.encode(x[:, :autoencoder.in_channels].to(device))
        stats.add(mu)
    return stats


class LatentCodec:
    """A frozen autoencoder and its scale factor: ``encode(x) = s * mu(x)``, ``decode(z) = D(z / s)``."""

    def __init__(self, autoencoder: KLAutoencoder, scale_factor: float):
        if not scale_factor > 0:
            raise ValueError(f"the latent scale factor must be > 0, got {scale_factor}")
        self.autoencoder = autoencoder.eval()
        for p in self.autoencoder.parameters():
            p.requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.digest = state_digest(self.autoencoder.state_dict())  # frozen: hashed once, not per message

    def to(self, device: torch.device | str) -> "LatentCodec":
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, *S]`` images -> ``[N, L, *S/f]`` scaled latents (the posterior mean)."""
        return self.autoencoder.encode(x)[0] * self.scale_factor

    @torch.no_grad()
    def encode_packed(self, x: torch.Tensor, *, condition_is_image: bool = False) -> torch.Tensor:
        """``[N, C + K, *S]`` packed examples -> ``[N, L + K, *S/f]``: the ``C`` image channels
        encoded, the ``K`` condition channels (none: a plain image) area-pooled to the latent grid
        (masks); with ``condition_is_image`` (a translation source, ``K = C``) the condition is
        encoded too, ``[N, 2 L, *S/f]``."""
        c = self.autoencoder.in_channels
        z = self.encode(x[:, :c])
        if x.shape[1] == c:
            return z
        if condition_is_image:
            return torch.cat([z, self.encode(x[:, c:])], dim=1)
        return torch.cat([z, condition_on_grid(x[:, c:], tuple(z.shape[2:])).to(z.dtype)], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, L, *S/f]`` scaled latents -> ``[N, C, *S]`` images."""
        return self.autoencoder.decode(z / self.scale_factor)

    def to_payload(self) -> dict[str, Any]:
        """Plain data for checkpoints (``torch.load(weights_only=True)``-safe)."""
        state = {k: v.detach().cpu() for k, v in self.autoencoder.state_dict().items()}
        return {"format": CODEC_FORMAT, "state": state, "scale_factor": self.scale_factor, "sha256": self.digest}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], autoencoder: KLAutoencoder, *, source: str = "checkpoint") -> "LatentCodec":
        """Load a :meth:`to_payload` dict into ``autoencoder`` (built from the stored config)."""
        if not isinstance(payload, Mapping) or payload.get("format") != CODEC_FORMAT:
            raise ValueError(f"{source}: holds no autoencoder (expected format {CODEC_FORMAT!r})")
        check_finite(payload["state"], source)
        try:
            autoencoder.load_state_dict(payload["state"])
        except RuntimeError as exc:
            raise ValueError(f"{source}: autoencoder weights do not fit the configured autoencoder: {exc}") from None
        codec = cls(autoencoder, float(payload["scale_factor"]))
        if payload.get("sha256") and codec.digest != payload["sha256"]:
            raise ValueError(f"{source}: autoencoder digest {codec.digest} does not match the stored {payload['sha256']}")
        return codec


class LatentDataset(Dataset):
    """Pre-encoded ``(z [L (+ K), *S/f], label)`` items, one per image of the source dataset, with the
    source's ``patient_ids`` (None: one patient per item), so a DP sampler over the latents samples
    the same records and patients as over the images."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, patient_ids: Optional[list[str]] = None):
        if len(latents) != len(labels):
            raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
        if patient_ids is not None and len(patient_ids) != len(labels):
            raise ValueError(f"{len(patient_ids)} patient ids but {len(labels)} latents")
        self.latents = latents.contiguous()
        self.labels = labels.long()
        self.patient_ids = None if patient_ids is None else list(patient_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.latents[i], self.labels[i]


@torch.no_grad()
def encode_dataset(codec: LatentCodec, dataset: Dataset, *, batch_size: int = 32, device: torch.device | str = "cpu",
                   progress: bool = False) -> LatentDataset:
    """Encode every example of ``dataset`` once (the first stage is frozen, so latents never change);
    packed examples keep their condition, pooled to the latent grid, or encoded when the dataset's
    ``condition_is_image`` (a translation source; :meth:`LatentCodec.encode_packed`)."""
    codec.to(device)
    latents, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size)
    image_condition = bool(getattr(dataset, "condition_is_image", False))
    for x, y in tqdm(loader, desc="encoding latents", disable=not progress, leave=False):
        latents.append(codec.encode_packed(x.to(device), condition_is_image=image_condition).cpu())
        labels.append(torch.as_tensor(y).reshape(-1))
    if not latents:
        raise ValueError("cannot encode an empty dataset")
    return LatentDataset(torch.cat(latents), torch.cat(labels), getattr(dataset, "patient_ids", None))
