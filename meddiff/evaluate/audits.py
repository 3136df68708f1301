"""Privacy-leakage audits: memorization (distance to closest record) and membership inference.

- **DCR** (distance to closest record, as in synthetic-data audits, e.g. Park et al. 2018 and
  Carlini et al. 2023, "Extracting Training Data from Diffusion Models", Sec. 4): for every
  generated image, the distance to its nearest training image, compared with the same distance
  for held-out real images. A generated image much closer to a training image than held-out
  images ever are is flagged as a near-duplicate.
- **Loss-based membership inference** (Yeom et al. 2018; for diffusion, Matsumoto et al. 2023 and
  Carlini et al. 2023, Sec. 5): the denoising loss at several fixed timesteps is lower on
  training members; the attack score is the negative mean loss. Reports ROC AUC and the TPR at 1%
  FPR, the figure Carlini et al. (2022, "Membership Inference Attacks From First Principles")
  recommend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from meddiff.diffusion import GaussianDiffusion, row_mse


@dataclass
class MemorizationResult:
    generated_to_train: np.ndarray  # [G] nearest-training distance of each generated image
    heldout_to_train: np.ndarray  # [H] nearest-training distance of each held-out image
    nearest_train_index: np.ndarray  # [G]
    threshold: float
    flagged: np.ndarray  # [G] bool

    def summary(self) -> dict:
        return {"dcr_generated_median": float(np.median(self.generated_to_train)),
                "dcr_heldout_median": float(np.median(self.heldout_to_train)),
                "dcr_ratio": float(np.median(self.generated_to_train) / max(np.median(self.heldout_to_train), 1e-12)),
                "near_duplicate_threshold": self.threshold, "near_duplicates": int(self.flagged.sum()),
                "near_duplicate_fraction": float(self.flagged.mean())}


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def memorization(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, *, quantile: float = 0.01) -> MemorizationResult:
    """DCR in pixel space. Images ``[N, C, *S]`` in [-1, 1]. A generated image is flagged when its
    nearest training image is closer than the ``quantile`` of held-out images' nearest distances
    (closer than 99% of genuinely new real images come)."""
    t = _flat(train)
    g = torch.cdist(_flat(generated), t)
    h = torch.cdist(_flat(heldout), t)
    g_min, g_idx = g.min(dim=1)
    h_min = h.min(dim=1).values.numpy()
    threshold = float(np.quantile(h_min, quantile))
    return MemorizationResult(g_min.numpy(), h_min, g_idx.numpy(), threshold, g_min.numpy() < threshold)


@torch.no_grad()
def diffusion_losses(model: nn.Module, diffusion: GaussianDiffusion, dataset: Dataset, *,
                     timesteps: Sequence[int] = (50, 100, 200, 400), draws: int = 2, seed: int = 0,
                     device: torch.device = torch.device("cpu"), batch_size: int = 64,
                     max_examples: Optional[int] = None) -> np.ndarray:
    """Per-example denoising loss ``[N]`` averaged over fixed timesteps and ``draws`` noise draws each,
    with the same noise for every example index (so members and non-members are scored alike)."""
    model.eval()
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    out = []
    gen = torch.Generator().manual_seed(seed)
    for x0, y in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size):
        x0 = x0.to(device)
        labels = y.to(device) if getattr(model, "num_classes", 0) else None
        total = torch.zeros(x0.shape[0], device=device)
        for t_value in timesteps:
            for _ in range(draws):
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.full((x0.shape[0],), int(t_value), device=device, dtype=torch.long)
                x_t = diffusion.q_sample(x0, t, noise)
                pred = model(x_t, t, labels) if labels is not None else model(x_t, t)
                total += row_mse(pred, diffusion.training_target(x0, t, noise))
        out.append((total / (len(timesteps) * draws)).cpu())
    return torch.cat(out).numpy()


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U)."""
    pos, neg = np.asarray(scores_pos, np.float64), np.asarray(scores_neg, np.float64)
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(scores_pos: np.ndarray, scores_neg: np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold where at most ``fpr`` of negatives score above it."""
    neg = np.sort(np.asarray(scores_neg, np.float64))[::-1]
    k = int(np.floor(fpr * len(neg)))
    threshold = neg[k] if k < len(neg) else -np.inf
    return float((np.asarray(scores_pos) > threshold).mean())


def membership_inference(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """Loss attack: lower loss means "member". Returns AUC and TPR at 1% FPR."""
    pos, neg = -np.asarray(member_losses), -np.asarray(nonmember_losses)
    return {"mia_auc": roc_auc(pos, neg), "mia_tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
            "members": int(len(pos)), "nonmembers": int(len(neg))}
