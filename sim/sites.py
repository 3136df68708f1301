"""Datasets of one pseudo-site, read from a split manifest, with that site's scanner effects."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from configs import ExperimentConfig
from meddiff.data.adapters import index_dataset
from meddiff.data.cache import MedicalDataset, content_digest
from meddiff.data.phantoms import Acquisition, apply_acquisition, make_phantoms


def _site_entry(manifest: dict[str, Any], site: int | str) -> tuple[int, dict[str, Any]]:
    sites = manifest["sites"]
    if isinstance(site, str):
        names = [s["name"] for s in sites]
        if site not in names:
            raise ValueError(f"no site {site!r} in the manifest; sites: {names}")
        site = names.index(site)
    if not 0 <= site < len(sites):
        raise ValueError(f"site index {site} out of range 0..{len(sites) - 1}")
    return site, sites[site]


class ScannerShift(Dataset):
    """Applies one site's :class:`Acquisition` to every item, deterministically per (seed, site, item)."""

    def __init__(self, base: Dataset, acquisition: Acquisition, *, seed: int, site: int):
        self.base, self.acquisition, self.seed, self.site = base, acquisition, seed, site
        self.labels = getattr(base, "labels", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        rng = np.random.default_rng([self.seed, self.site, i])
        arr = (x.numpy() + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        planes = arr.reshape(-1, *arr.shape[-2:])
        shifted = np.stack([apply_acquisition(p, self.acquisition, rng) for p in planes]).reshape(arr.shape)
        return torch.from_numpy(shifted * 2.0 - 1.0).float(), y


def site_dataset(manifest: dict[str, Any], site: int | str, cfg: ExperimentConfig, *, split: str = "train") -> Dataset:
    """The ``train`` or ``test`` data of one site, as ``(image, label)`` tuples in [-1, 1].

    Source files are checked against the manifest's content hashes, so a dataset that changed after
    the split is an error rather than a silent mismatch.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    index, entry = _site_entry(manifest, site)
    samples = entry[split]["samples"]
    acq = Acquisition(**entry["acquisition"]) if entry.get("acquisition") else None
    seed = manifest["seed"]
    d = cfg.data
    if manifest["dataset"] == "phantoms":
        images, labels = [], []
        for s in samples:
            i = int(s["id"].split("_")[-1])
            img, lab = make_phantoms(1, d.image_size, seed=d.seed, lesion_fraction=d.lesion_fraction, start=i,
                                     **({"acquisition": acq} if acq else {}))
            images.append(img[0])
            labels.append(int(lab[0]))
        dataset = _Tensors(np.stack(images)[:, None] * 2.0 - 1.0 if images else np.zeros((0, 1, d.image_size, d.image_size)), labels)
        return dataset
    wanted = {s["id"]: s["sha256"] for s in samples}
    records = [r for r in index_dataset(d).records if r.sample_id in wanted]
    missing = sorted(set(wanted) - {r.sample_id for r in records})
    if missing:
        raise ValueError(f"{len(missing)} manifest sample(s) not found in {d.path}, e.g. {missing[0]!r}")
    for r in records:
        if r.kind != "npz" and content_digest(r) != wanted[r.sample_id]:
            raise ValueError(f"{r.files[0]}: content changed since the split (sample {r.sample_id}); re-run `meddiff data split`")
    base = MedicalDataset(records, d, spatial_dims=cfg.model.spatial_dims, train=split == "train")
    return ScannerShift(base, acq, seed=seed, site=index) if acq else base


class _Tensors(Dataset):
    def __init__(self, images: np.ndarray, labels: list[int]):
        self.images = torch.from_numpy(np.asarray(images, dtype=np.float32))
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]
