"""In-memory datasets that yield ``(image, label)`` tuples, as Opacus's Poisson sampler expects."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Images scaled to [-1, 1] and resized to ``image_size``.

    Args:
        images: ``[N, C, *S]`` uint8 (scaled by 1/255) or float in [0, 1].
        labels: ``[N]`` integer labels.
        image_size: target side length; resized with area (down) or bilinear (up) interpolation.
        channels: if given, grey images are repeated / RGB images averaged to this many channels.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, image_size: int | None = None, channels: int | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        x = torch.from_numpy(np.asarray(images))
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if channels is not None and x.shape[1] != channels:
            if channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.repeat_interleave(channels, dim=1)
            else:
                raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
        spatial = x.shape[2:]
        if image_size is not None and any(s != image_size for s in spatial):
            size = (image_size,) * len(spatial)
            shrinking = all(s >= image_size for s in spatial)
            mode = "area" if shrinking else ("bilinear" if len(spatial) == 2 else "trilinear")
            kwargs = {} if mode == "area" else {"align_corners": False}
            x = F.interpolate(x, size=size, mode=mode, **kwargs)
        self.images = x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class WithMasks(Dataset):
    """``(image, label)`` items of ``dataset`` with their masks: ``(image, label, mask [K, *S])``.

    Args:
        dataset: any ``(image, label)`` dataset.
        masks: ``[N, K, *S]`` uint8 in {0, 1}, aligned with ``dataset``'s items.
        channels: the name of each of the ``K`` mask channels.
    """

    def __init__(self, dataset: Dataset, masks: torch.Tensor, channels: tuple[str, ...]):
        if len(masks) != len(dataset) or masks.shape[1] != len(channels):
            raise ValueError(f"{len(masks)} masks of {masks.shape[1]} channels for {len(dataset)} items and channels {channels}")
        self.dataset, self.masks, self.mask_channels = dataset, masks, tuple(channels)
        self.labels = getattr(dataset, "labels", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], self.masks[i])


class PackedMasks(Dataset):
    """A dataset of ``(image [C, *S], label, mask [K, *S])`` triples seen as ``(x0, label)`` pairs
    with ``x0 = cat([image, 2 * mask - 1])`` of shape ``[C + K, *S]``: the packed form the
    spatially conditioned objective (:class:`meddiff.diffusion.SpatialConditioning`) splits, which
    every ``(x0, y)`` consumer (loaders, Poisson sampling, per-example gradients) carries as is.
    """

    def __init__(self, dataset: Dataset):
        first = dataset[0] if len(dataset) else None
        if first is not None and len(first) != 3:
            raise ValueError(f"{type(dataset).__name__} yields {len(first)}-tuples, not (image, label, mask): it has no masks")
        self.dataset = dataset
        self.labels = getattr(dataset, "labels", None)
        self.mask_channels = tuple(getattr(dataset, "mask_channels", ()))
        if getattr(dataset, "patient_ids", None) is not None:
            self.patient_ids = dataset.patient_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label, mask = self.dataset[i]
        return torch.cat([image, mask.float().mul(2.0).sub(1.0)], dim=0), label


class ImageChannels(Dataset):
    """The image alone of each ``(x0 [C + K, *S], label)`` example of ``dataset``: ``(x0[:C], label)``
    (what a first-stage autoencoder trains on when the examples are packed with their masks); an
    example of ``C`` channels passes unchanged. Keeps the dataset's ``labels`` and ``patient_ids``."""

    def __init__(self, dataset: Dataset, channels: int):
        if channels < 1:
            raise ValueError(f"an image has at least 1 channel, got {channels}")
        self.dataset, self.channels = dataset, channels
        self.labels = getattr(dataset, "labels", None)
        if getattr(dataset, "patient_ids", None) is not None:
            self.patient_ids = dataset.patient_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, label = self.dataset[i]
        return x[:self.channels], label


def patient_ids(dataset: Dataset) -> list[str]:
    """The patient of every item of ``dataset``, ``[len(dataset)]`` strings aligned with its indices.

    A dataset that knows its patients says so in a ``patient_ids`` list (the slices of one volume,
    the scans of one patient, their latents); any other dataset, such as generated phantoms or an
    :class:`ArrayDataset`, holds one item per patient, and each item is its own patient.
    """
    ids = getattr(dataset, "patient_ids", None)
    if ids is None:
        return [f"#{i}" for i in range(len(dataset))]
    if len(ids) != len(dataset):
        raise ValueError(f"{type(dataset).__name__}: {len(ids)} patient ids for {len(dataset)} items")
    return [str(p) for p in ids]
