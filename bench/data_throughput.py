"""Slices per second delivered to training: the memory-mapped cache against reading NIfTI on the fly.

A BraTS-layout dataset is written to a temporary folder (half-resolution BraTS volumes,
120x120x78, four modalities + seg). Both pipelines serve random batches of 32 axial slices at the
default model size (32x32) through a DataLoader:

- on the fly: every item opens its NIfTI (and seg), orients, normalises and slices it (what a
  loader without a cache does);
- cached: preprocessed arrays are built once, then memory-mapped.

It also times one train step of the default model, so that the share of a round spent loading
data can be reported. Prints one JSON object.

    python bench/data_throughput.py [--cases 6] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from configs import load_config  # noqa: E402
from meddiff.recipes.build import build_diffusion, build_unet_from_section  # noqa: E402
from meddiff.data.adapters import index_dataset  # noqa: E402
from meddiff.data.cache import ArrayCache, MedicalDataset  # noqa: E402
from meddiff.data.records import load_record  # noqa: E402
from meddiff.train import train_step  # noqa: E402


def write_brats(root: Path, cases: int, shape=(120, 120, 78)) -> None:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    for i in range(cases):
        case = f"BraTS-GLI-{i:05d}-000"
        (root / case).mkdir(parents=True)
        img = (np.where(r < 0.85, 400.0, 0.0) + np.where(r < 0.5, 300.0, 0.0) + rng.normal(0, 20, shape)).clip(0).astype(np.float32)
        seg = ((np.abs(grid[0] - 0.2) < 0.15) & (np.abs(grid[1]) < 0.2) & (np.abs(grid[2]) < 0.2)).astype(np.uint8)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        for m in ("t1n", "t1c", "t2w", "t2f"):
            nib.save(nib.Nifti1Image(img, affine), str(root / case / f"{case}-{m}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(root / case / f"{case}-seg.nii.gz"))


class OnTheFly(Dataset):
    """Item ``i`` re-reads and re-preprocesses its volume, then returns one slice."""

    def __init__(self, records, cfg, slices_per_record):
        self.records, self.cfg = records, cfg
        self.items = [(r, j) for r, n in zip(records, slices_per_record) for j in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        record, j = self.items[i]
        images, labels = load_record(record, self.cfg)
        return torch.from_numpy(images[j].copy()), int(labels[j])


def slices_per_second(dataset, batches: int, batch_size: int = 32) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, replacement=True,
                        num_samples=batches * batch_size, generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--fly-batches", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "brats"
        write_brats(root, args.cases)
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", ["data.dataset=brats", f"data.path={root}", f"data.cache_dir={Path(tmp) / 'cache'}"])
        records = index_dataset(cfg.data).records
        t0 = time.perf_counter()
        cached = MedicalDataset(records, cfg.data, cache=ArrayCache(cfg.data.cache_dir))
        build_s = time.perf_counter() - t0
        counts = [int(np.diff(cached._offsets)[k]) for k in range(len(records))]
        reopened = MedicalDataset(records, cfg.data, cache=ArrayCache(cfg.data.cache_dir))  # memory-mapped hits
        fly = OnTheFly(records, cfg.data, counts)
        fly_rate = slices_per_second(fly, args.fly_batches)
        cache_rate = slices_per_second(reopened, args.batches)

        torch.manual_seed(0)
        model = build_unet_from_section(cfg.model, cfg.data.image_size)
        diffusion = build_diffusion(cfg.diffusion)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(32, 1, cfg.data.image_size, cfg.data.image_size)
        y = torch.randint(0, 2, (32,))
        train_step(model, diffusion, opt, x, y)
        t0 = time.perf_counter()
        for _ in range(5):
            train_step(model, diffusion, opt, x, y)
        step_s = (time.perf_counter() - t0) / 5
        batch_load_s = 32 / cache_rate
    print(json.dumps({
        "benchmark": "data_throughput",
        "cases": args.cases,
        "volume_shape": [120, 120, 78],
        "slices_in_dataset": len(cached),
        "cache_build_s": round(build_s, 2),
        "slices_per_s": {"on_the_fly_nifti": round(fly_rate, 1), "cached_mmap": round(cache_rate, 1)},
        "cache_speedup": round(cache_rate / fly_rate, 1),
        "target_cache_speedup": 10.0,
        "default_model_step_s": round(step_s, 4),
        "batch32_load_s": round(batch_load_s, 5),
        "loading_share_of_step": round(batch_load_s / (batch_load_s + step_s), 4),
        "target_loading_share": 0.05,
    }, indent=2))


if __name__ == "__main__":
    main()
