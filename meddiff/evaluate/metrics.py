"""Distribution metrics on encoder features, and image-level similarity metrics.

Features are float64 numpy arrays ``[N, D]``. Hand-written where the formula is a few lines of
linear algebra and the reference packages (pytorch-fid, torch-fidelity, prdc) would add heavy or
network-touching dependencies; each function cites the paper and matches its reference
implementation. Image metrics (SSIM, MS-SSIM, PSNR) come from MONAI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg


@dataclass(frozen=True)
class FeatureStats:
    """Count, mean ``[D]`` and unbiased covariance ``[D, D]`` of a feature set (what FID needs)."""

    count: int
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
        return cls(f.shape[0], f.mean(0), np.cov(f, rowvar=False))

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Exact pooled statistics of two disjoint sets (Chan, Golub & LeVeque 1979, pairwise update)."""
        n, m = self.count, other.count
        total = n + m
        delta = other.mean - self.mean
        mean = self.mean + delta * (m / total)
        scatter = self.cov * (n - 1) + other.cov * (m - 1) + np.outer(delta, delta) * (n * m / total)
        return FeatureStats(total, mean, scatter / (total - 1))

    def to_dict(self) -> dict:
        return {"count": int(self.count), "mean": self.mean.tolist(), "cov": self.cov.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        return cls(int(d["count"]), np.asarray(d["mean"], dtype=np.float64), np.asarray(d["cov"], dtype=np.float64))


def merge_stats(parts: list[FeatureStats]) -> FeatureStats:
    if not parts:
        raise ValueError("no statistics to merge")
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017, eq. 6), computed as
    pytorch-fid's ``calculate_frechet_distance`` does (offset on a singular product, real part)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, subsets: int = 20, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over random
    subsets (Binkowski et al. 2018, Sec. 3); returns (mean, std) as torch-fidelity does."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]``."""
    a, b = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    return torch.cdist(a, b).numpy()


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3): the fraction of fake
    samples inside the union of real k-NN balls, and of real samples inside the fake manifold."""
    r_radii, f_radii = _knn_radii(real, k), _knn_radii(fake, k)
    d = _pairwise(real, fake)  # [R, F]
    precision = float((d <= r_radii[:, None]).any(axis=0).mean())
    recall = float((d <= f_radii[None, :]).any(axis=1).mean())
    return precision, recall


def density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, eqs. 3-4), as in the ``prdc`` package."""
    r_radii = _knn_radii(real, k)
    d = _pairwise(real, fake)
    density = float((d < r_radii[:, None]).sum(axis=0).mean() / k)
    coverage = float((d.min(axis=1) < r_radii).mean())
    return density, coverage


def _as_2d_batch(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, *S]`` in [-1, 1] to float32 in [0, 1]."""
    return ((images.float().clamp(-1, 1) + 1) / 2).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair SSIM ``[N]`` of images in [-1, 1] (Wang et al. 2004), MONAI's ``SSIMMetric``."""
    from monai.metrics import SSIMMetric

    spatial = a.dim() - 2
    metric = SSIMMetric(spatial_dims=spatial, data_range=1.0, win_size=min(7, min(a.shape[2:]) // 2 * 2 - 1))
    return metric(_as_2d_batch(a), _as_2d_batch(b)).reshape(-1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair PSNR ``[N]`` in dB of images in [-1, 1] (data range 1 after rescaling)."""
    from monai.metrics import PSNRMetric

    return PSNRMetric(max_val=1.0)(_as_2d_batch(a), _as_2d_batch(b)).reshape(-1)


def ms_ssim_diversity(images: torch.Tensor, *, pairs: int = 200, seed: int = 0) -> float:
    """Mean pairwise (MS-)SSIM within a set over random pairs: lower means more diverse (Odena et
    al. 2017, Sec. 4.3). Uses MONAI's ``MultiScaleSSIMMetric`` when the images are large enough for
    its 5 scales, single-scale SSIM otherwise (e.g. 28x28 MedMNIST)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 images")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=pairs)
    j = (i + rng.integers(1, n, size=pairs)) % n
    a, b = images[torch.from_numpy(i)], images[torch.from_numpy(j)]
    if min(images.shape[2:]) >= 160:
        from monai.metrics import MultiScaleSSIMMetric

        metric = MultiScaleSSIMMetric(spatial_dims=images.dim() - 2, data_range=1.0)
        return float(metric(_as_2d_batch(a), _as_2d_batch(b)).mean())
    return float(ssim(a, b).mean())
