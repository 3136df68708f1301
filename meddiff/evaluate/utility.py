"""Downstream utility: is the synthetic data useful for training a diagnostic model?

TSTR, train on synthetic and test on real (Esteban et al. 2017, "Real-valued (Medical) Time Series
Generation with Recurrent Conditional GANs", Sec. 4.2), against TRTR (train on real) and real plus
synthetic augmentation. The classifier is the same small CNN as the domain encoder, trained with
the same budget in every arm; the test set is the real held-out split.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import TensorDataset

from meddiff.evaluate.encoders import train_domain_encoder


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i:i + batch_size].float()).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(len(images), 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, steps: int, seed: int = 0) -> torch.nn.Module:
    model, _ = train_domain_encoder(TensorDataset(images.float(), labels.long()), in_channels=images.shape[1],
                                    num_classes=num_classes, steps=steps, seed=seed, progress=False)
    return model


def downstream_utility(*, real_train: tuple[torch.Tensor, torch.Tensor], synthetic: tuple[torch.Tensor, torch.Tensor],
                       real_test: tuple[torch.Tensor, torch.Tensor], num_classes: int, steps: int = 300, seed: int = 0) -> dict:
    """Test accuracy on real held-out images of classifiers trained on real (TRTR), synthetic (TSTR)
    and real + synthetic data, each for ``steps`` steps. Images ``[N, C, H, W]`` in [-1, 1]."""
    test_x, test_y = real_test
    arms = {
        "tstr": synthetic,
        "real_plus_synthetic": (torch.cat([real_train[0], synthetic[0]]), torch.cat([real_train[1], synthetic[1]])),
    }
    score = lambda x, y: accuracy(train_classifier(x, y, num_classes=num_classes, steps=steps, seed=seed), test_x, test_y)  # noqa: E731
    key = _digest(*real_train, *real_test, torch.tensor([num_classes, steps, seed]))
    if key not in _TRTR:  # the same real data give the same TRTR for every checkpoint evaluated in this process
        _TRTR[key] = score(*real_train)
    out = {"trtr_accuracy": _TRTR[key], **{f"{name}_accuracy": score(x, y) for name, (x, y) in arms.items()}}
    out["majority_class_accuracy"] = float(torch.bincount(test_y.long(), minlength=num_classes).max()) / max(len(test_y), 1)
    out["tstr_over_trtr"] = out["tstr_accuracy"] / max(out["trtr_accuracy"], 1e-12)
    out["classifier_steps"] = steps
    return out


#: TRTR accuracy by the digest of (real train, real test, classes, steps, seed).
_TRTR: dict[str, float] = {}


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
