"""Feature encoders for Frechet-type metrics, in a registry. None of them touches the network.

- ``domain``: a small CNN trained as a classifier of the evaluation dataset's labels on its real
  training images (Inception features describe ImageNet photos, not 28x28 chest X-rays; a domain
  network is the usual remedy in medical generative work). Trained by
  ``meddiff evaluate train-encoder``; weights and config are saved together and every report
  names the encoder file and its digest.
- ``inception``: torchvision's Inception-v3 pool features, only from a weights file the user
  supplies (``--encoder-weights``); it never downloads.
- ``pixels``: the flattened image (a baseline).
- ``random_projection``: a fixed Gaussian projection of the pixels (a baseline with a fixed seed).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

ENCODER_FORMAT = "meddiff-encoder/1"


class DomainCNN(nn.Module):
    """Four conv blocks (conv, GroupNorm, SiLU, pooling) -> ``feature_dim`` features -> logits.

    Input ``[N, C, H, W]`` in [-1, 1]; ``features(x)`` is ``[N, feature_dim]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32, feature_dim: int = 128):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 4]
        layers, c = [], in_channels
        for i, out in enumerate(chans):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            layers.append(nn.AvgPool2d(2) if i < len(chans) - 1 else nn.AdaptiveAvgPool2d(1))
            c = out
        self.body = nn.Sequential(*layers)
        self.project = nn.Linear(c, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width, "feature_dim": feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.project(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_domain_encoder(dataset: Dataset, *, in_channels: int, num_classes: int, steps: int = 600, batch_size: int = 64,
                         lr: float = 2e-3, seed: int = 0, device: torch.device = torch.device("cpu"),
                         progress: bool = True) -> tuple[DomainCNN, dict]:
    """Train :class:`DomainCNN` as a classifier of ``dataset``'s labels (flip augmentation off:
    chest X-rays and brain slices are not left-right symmetric in their labels)."""
    if num_classes < 2:
        raise ValueError("the domain encoder is trained as a classifier and needs labels with at least 2 classes")
    torch.manual_seed(seed)
    model = DomainCNN(in_channels, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    losses, correct, seen, step = [], 0, 0, 0
    bar = tqdm(total=steps, desc="domain encoder", disable=not progress, dynamic_ncols=True)
    while step < steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device).long()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if step >= steps - 50:
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            step += 1
            bar.update(1)
            if step >= steps:
                break
    bar.close()
    return model.eval(), {"steps": steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                          "train_accuracy_last_50_steps": correct / max(seen, 1)}


def save_encoder(path: str | Path, model: DomainCNN, *, image_size: int, dataset: str, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": ENCODER_FORMAT, "kind": "domain", "config": model.config, "image_size": image_size,
                "dataset": dataset, "info": info, "state_dict": model.state_dict()}, path)
    return path


def read_model_file(path: str | Path, file_format: str, what: str, hint: str = "") -> dict:
    """The dict saved in a project model file of ``file_format`` (``weights_only=True``: no code is
    unpickled); a clear error naming the file when it is missing or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}{hint}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != file_format:
        raise ValueError(f"{path}: not a meddiff {what} file (format {blob.get('format') if isinstance(blob, dict) else None!r})")
    return blob


def load_domain_encoder(path: str | Path) -> tuple[DomainCNN, dict]:
    blob = read_model_file(path, ENCODER_FORMAT, "encoder", " (train one with `meddiff evaluate train-encoder`)")
    model = DomainCNN(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Encoder:
    """``encode(images [N, C, H, W] in [-1, 1]) -> features [N, D]`` (float64 numpy), plus a name."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], description: str):
        self.name, self._fn, self.description = name, fn, description

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256):
        out = [self._fn(images[i:i + batch_size].float()).double().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()


def _pixels(_: Optional[str], **__) -> Encoder:
    return Encoder("pixels", lambda x: x.reshape(x.shape[0], -1), "raw pixels (baseline)")


def _random_projection(_: Optional[str], *, dim: int = 128, seed: int = 0, **__) -> Encoder:
    cache: dict = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] not in cache:
            g = torch.Generator().manual_seed(seed)
            cache[flat.shape[1]] = torch.randn(flat.shape[1], dim, generator=g) / math.sqrt(flat.shape[1])
        return flat @ cache[flat.shape[1]]

    return Encoder("random_projection", fn, f"Gaussian random projection to {dim} dims, seed {seed} (baseline)")


def _domain(weights: Optional[str], **__) -> Encoder:
    if not weights:
        raise ValueError("the domain encoder needs its weights file (--encoder-weights); "
                         "train one with `meddiff evaluate train-encoder`")
    model, blob = load_domain_encoder(weights)
    size = int(blob["image_size"])

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return model.features(x)

    return Encoder("domain", fn, f"domain CNN {Path(weights).name} (sha256 {file_sha256(weights)}, trained on "
                                 f"{blob['dataset']}, {blob['info'].get('steps')} steps)")


def _inception(weights: Optional[str], **__) -> Encoder:
    if not weights or not Path(weights).is_file():
        raise ValueError("the inception encoder needs a local Inception-v3 weights file (--encoder-weights PATH, "
                         "e.g. torchvision's inception_v3_google-0cc3c7bd.pth); meddiff never downloads weights")
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise ValueError("the inception encoder needs torchvision (pip install torchvision matching your torch)") from None
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = nn.Identity()
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = (x.clamp(-1, 1) + 1) / 2
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return model((x - mean) / std)

    return Encoder("inception", fn, f"Inception-v3 pool features from {Path(weights).name}")


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "domain": _domain, "inception": _inception, "pixels": _pixels, "random_projection": _random_projection,
}


def build_encoder(name: str, weights: Optional[str] = None, **kwargs) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](weights, **kwargs)
