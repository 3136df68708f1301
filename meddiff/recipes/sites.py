"""What a site reads: split manifests and the datasets of one site.

A manifest is written by the simulation harness (``sim/manifest.py``); sites only read it here.
Without a manifest, the embedded phantom default generates each site's data directly
(:func:`phantom_site`): its own seed stream, tumour prevalence and scanner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from configs import ExperimentConfig
from meddiff.data.adapters import index_dataset
from meddiff.data.cache import MedicalDataset, content_digest
from meddiff.data.datasets import ArrayDataset, WithMasks
from meddiff.data.masked import MaskedVolumeDataset
from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.data.phantoms import Acquisition, apply_acquisition, make_phantoms, site_acquisition
from meddiff.recipes.build import pack_masks
from meddiff.recipes.phases import denoiser_phase
from meddiff.recipes.translation_data import paired_records_data, phantom_pairs_data
from meddiff.data.paired import PackedSource

MANIFEST_VERSION = 1


def check_disjoint(manifest: dict[str, Any]) -> None:
    """Raise ``ValueError`` if a patient or sample appears in more than one split."""
    seen: dict[str, str] = {}
    seen_samples: dict[str, str] = {}
    splits = [("global_test", manifest["global_test"])] + ([("public", manifest["public"])] if "public" in manifest else [])
    for site in manifest["sites"]:
        splits += [(f"{site['name']}/train", site["train"]), (f"{site['name']}/test", site["test"])]
    for where, split in splits:
        for s in split["samples"]:
            for key, table in ((s["patient"], seen), (s["id"], seen_samples)):
                owner = table.setdefault(key, where)
                if owner != where:
                    raise ValueError(f"{key!r} is in both {owner} and {where}")


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported manifest version {manifest.get('manifest_version')!r}")
    check_disjoint(manifest)
    return manifest





def verify_manifest(manifest: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Check that every sample of a stored manifest is still there with the same content (before a
    resumed run reuses the split). Returns how many records the data holds that the manifest does
    not (rows added since the split, which the run leaves out); raises ``ValueError`` naming the
    first missing or changed sample."""
    if manifest["dataset"] == "phantoms":
        return 0
    wanted = {s["id"]: s["sha256"] for part in _parts(manifest) for s in part["samples"]}
    records = {r.sample_id: r for r in index_dataset(cfg.data).records}
    missing = sorted(set(wanted) - set(records))
    if missing:
        raise ValueError(f"the data at {cfg.data.path} no longer holds {len(missing)} sample(s) of the run's split "
                         f"manifest, e.g. {missing[0]!r}; resume with the data the run started with")
    for sid, digest in wanted.items():
        if content_digest(records[sid]) != digest:
            raise ValueError(f"{records[sid].files[0]}: content changed since the split (sample {sid}); resume with "
                             "the data the run started with")
    return len(set(records) - set(wanted))


def _parts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    public = [manifest["public"]] if "public" in manifest else []
    return [manifest["global_test"], *public] + [site[k] for site in manifest["sites"] for k in ("train", "test")]


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
        self.patient_ids = getattr(base, "patient_ids", None)
        self.mask_channels = getattr(base, "mask_channels", ())
        self.condition_is_image = getattr(base, "condition_is_image", False)  # a translation source shifts too

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, *rest = self.base[i]  # (image, label) or (image, label, mask): anatomy, so masks, do not move
        rng = np.random.default_rng([self.seed, self.site, i])
        if self.condition_is_image:  # (target, label, source): one session, both images through the scanner
            rest[-1] = self._shift(rest[-1], rng)
        return (self._shift(x, rng), *rest)

    def _shift(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        arr = (x.numpy() + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        planes = arr.reshape(-1, *arr.shape[-2:])
        shifted = np.stack([apply_acquisition(p, self.acquisition, rng) for p in planes]).reshape(arr.shape)
        return torch.from_numpy(shifted * 2.0 - 1.0).float()


def site_dataset(manifest: dict[str, Any], site: int | str, cfg: ExperimentConfig, *, split: str = "train") -> Dataset:
    """The ``train`` or ``test`` data of one site, as ``(image, label)`` tuples in [-1, 1].

    Source files are checked against the manifest's content hashes, so a dataset that changed after
    the split is an error rather than a silent mismatch.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    index, entry = _site_entry(manifest, site)
    acq = Acquisition(**entry["acquisition"]) if entry.get("acquisition") else None
    base = _manifest_data(manifest, entry[split]["samples"], cfg, train=split == "train", acquisition=acq)
    data = ScannerShift(base, acq, seed=manifest["seed"], site=index) if acq and manifest["dataset"] != "phantoms" else base
    return _examples(data, cfg)


def public_dataset(manifest: dict[str, Any], cfg: ExperimentConfig) -> Dataset:
    """The manifest's public split (``partition.public_fraction``): patients carved out before the
    sites were assigned, standing for an open dataset to pre-train on. No scanner shift."""
    samples = manifest.get("public", {}).get("samples", [])
    if not samples:
        raise ValueError("the manifest has no public split; build one with `meddiff data split ... "
                         "partition.public_fraction=0.2`")
    return _examples(_manifest_data(manifest, samples, cfg, train=True, acquisition=None), cfg)


def _examples(data: Dataset, cfg: ExperimentConfig) -> Dataset:
    """What the study's denoiser trains on: ``data`` as is, its (image, mask) pairs packed, or its
    (target, source) pairs packed."""
    if _with_source(cfg):
        return PackedSource(data)
    return pack_masks(data, cfg) if _with_masks(cfg) else data


def _with_source(cfg: ExperimentConfig) -> bool:
    return denoiser_phase(cfg).packs_source


def _with_masks(cfg: ExperimentConfig) -> bool:
    return denoiser_phase(cfg).packs_masks


def _manifest_data(manifest: dict[str, Any], samples: list[dict], cfg: ExperimentConfig, *, train: bool,
                   acquisition: Optional[Acquisition]) -> Dataset:
    """The manifest's ``samples``, checked against their content hashes."""
    d, masks = cfg.data, _with_masks(cfg)
    if manifest["dataset"] == "phantoms" and _with_source(cfg):
        return phantom_pairs_data(cfg, [int(s["id"].split("_")[-1]) for s in samples], seed=d.seed,
                                  lesion_fraction=d.lesion_fraction, acquisition=acquisition)
    if manifest["dataset"] == "phantoms":
        images, labels, regions = [], [], []
        for s in samples:
            i = int(s["id"].split("_")[-1])
            made = make_phantoms(1, d.image_size, seed=d.seed, lesion_fraction=d.lesion_fraction, start=i, masks=masks,
                                 **({"acquisition": acquisition} if acquisition else {}))
            images.append(made[0][0])
            labels.append(int(made[1][0]))
            regions += [made[2][0]] if masks else []
        stacked = np.stack(images)[:, None] if images else np.zeros((0, 1, d.image_size, d.image_size), np.float32)
        data = ArrayDataset(stacked, np.asarray(labels, np.int64))
        return WithMasks(data, torch.from_numpy(np.stack(regions)), MASK_CHANNELS) if masks else data
    wanted = {s["id"]: s["sha256"] for s in samples}
    records = [r for r in index_dataset(d).records if r.sample_id in wanted]
    missing = sorted(set(wanted) - {r.sample_id for r in records})
    if missing:
        raise ValueError(f"{len(missing)} manifest sample(s) not found in {d.path}, e.g. {missing[0]!r}")
    for r in records:
        if r.kind != "npz" and content_digest(r) != wanted[r.sample_id]:
            raise ValueError(f"{r.files[0]}: content changed since the split (sample {r.sample_id}); re-run `meddiff data split`")
    return _records_data(records, d, cfg, train=train)


def _records_data(records: list, data_cfg, cfg: ExperimentConfig, *, train: bool) -> Dataset:
    """Records as images, or for a mask-conditioned study as (image, label, mask) triples, or for a
    translation study as (target, label, source) triples."""
    if _with_source(cfg):
        return paired_records_data(records, data_cfg, cfg, train=train)
    dataset = MaskedVolumeDataset if _with_masks(cfg) else MedicalDataset
    return dataset(records, data_cfg, spatial_dims=cfg.model.spatial_dims, train=train)


def records_dataset(records: list, cfg: ExperimentConfig, *, train: bool, data_cfg=None) -> Dataset:
    """A site's records (``data_cfg``, default ``cfg.data``) as the study's examples: images, or
    for a mask-conditioned study images packed with their masks."""
    return _examples(_records_data(records, data_cfg or cfg.data, cfg, train=train), cfg)


def phantom_site_plan(site: int, num_sites: int, cfg: ExperimentConfig) -> dict[str, Any]:
    """How the embedded default generates site ``site`` of ``num_sites`` (no manifest needed).

    Each site draws from its own seed stream (so sites are disjoint by construction), has its own
    tumour prevalence (label skew: evenly spread over 0.2..0.8 across sites) and, with
    ``partition.scanner_shift``, its own scanner (:func:`site_acquisition`). The site holds
    ``data.num_samples // num_sites`` slices, of which ``partition.site_test_fraction`` are held out.
    """
    if not 0 <= site < num_sites:
        raise ValueError(f"site {site} out of range 0..{num_sites - 1}")
    n = max(2, cfg.data.num_samples // num_sites)
    n_test = max(1, int(round(cfg.partition.site_test_fraction * n)))
    prevalence = 0.5 if num_sites == 1 else 0.2 + 0.6 * site / (num_sites - 1)
    acq = site_acquisition(site, cfg.partition.seed) if cfg.partition.scanner_shift else None
    return {"seed": 100_003 * (site + 1) + cfg.data.seed, "num_train": n - n_test, "num_test": n_test,
            "lesion_fraction": prevalence, "acquisition": acq}


def phantom_site(site: int, num_sites: int, cfg: ExperimentConfig, *, split: str = "train") -> Dataset:
    """The generated data of one embedded-default site (see :func:`phantom_site_plan`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    plan = phantom_site_plan(site, num_sites, cfg)
    num, start = (plan["num_train"], 0) if split == "train" else (plan["num_test"], plan["num_train"])
    kwargs = {"acquisition": plan["acquisition"]} if plan["acquisition"] else {}
    if _with_source(cfg):
        return _examples(phantom_pairs_data(cfg, range(start, start + num), seed=plan["seed"],
                                            lesion_fraction=plan["lesion_fraction"], **kwargs), cfg)
    masks = _with_masks(cfg)
    made = make_phantoms(num, cfg.data.image_size, seed=plan["seed"], lesion_fraction=plan["lesion_fraction"],
                         start=start, masks=masks, **kwargs)
    data = ArrayDataset(made[0][:, None], made[1])
    return _examples(WithMasks(data, torch.from_numpy(made[2]), MASK_CHANNELS), cfg) if masks else data
