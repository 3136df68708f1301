"""A site's copy of the frozen first stage (latent diffusion), and its pre-encoded data.

The server sends the trained autoencoder once, in a QUERY message, at the start of phase 2. The
site keeps it in ``context.state`` and, when it has a state directory, on its own disk
(``<state-dir>/autoencoders/<digest>.pt``), so a restarted site daemon does not need it again.
Every phase-2 message names the autoencoder by digest and scale factor; a site that does not hold
it says so and the server sends it again. The site's data is encoded once per autoencoder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.utils.data import Dataset

from configs import ExperimentConfig
from meddiff.recipes.build import build_autoencoder
from meddiff.checkpoint import load_state_file, save_state_file
from meddiff.device import resolve_device
from meddiff.latent import LatentCodec, LatentDataset, encode_dataset, state_digest

log = logging.getLogger("meddiff.site")

WEIGHTS_KEY = "autoencoder-weights"
INFO_KEY = "autoencoder"
_LATENTS: dict[tuple, LatentDataset] = {}


def _disk_path(state_dir: Optional[Path], digest: str) -> Optional[Path]:
    return None if state_dir is None else Path(state_dir) / "autoencoders" / f"{digest}.pt"


def install_autoencoder(state: Optional[RecordDict], weights: dict[str, torch.Tensor], *, digest: str, scale: float,
                        state_dir: Optional[Path]) -> None:
    """Keep the server's autoencoder (checked against its digest) in ``context.state`` and on disk."""
    if state_digest(weights) != digest:
        raise ValueError(f"the autoencoder received does not match its digest {digest}; refusing to install it")
    if state is not None:
        state[WEIGHTS_KEY] = ArrayRecord({k: v.contiguous() for k, v in weights.items()})
        state[INFO_KEY] = ConfigRecord({"digest": digest, "scale": float(scale)})
    path = _disk_path(state_dir, digest)
    if path is not None and not path.exists():
        save_state_file(path, weights)


def set_scale(state: Optional[RecordDict], digest: str, scale: float) -> bool:
    """Record the federated scale factor for the installed autoencoder; False if it is not held."""
    if state is None or INFO_KEY not in state or str(state[INFO_KEY]["digest"]) != digest:
        return False
    state[INFO_KEY] = ConfigRecord({"digest": digest, "scale": float(scale)})
    return True


def site_codec(cfg: ExperimentConfig, state: Optional[RecordDict], *, digest: str, scale: float,
               state_dir: Optional[Path]) -> Optional[LatentCodec]:
    """The autoencoder named by ``digest`` with the server's scale factor, or None if the site
    holds neither a copy in ``context.state`` nor one on disk."""
    weights = None
    if state is not None and INFO_KEY in state and str(state[INFO_KEY]["digest"]) == digest:
        weights = state[WEIGHTS_KEY].to_torch_state_dict()
    else:
        path = _disk_path(state_dir, digest)
        if path is not None and path.is_file():
            weights = load_state_file(path)
            if state_digest(weights) != digest:
                log.warning("%s does not match its digest; ignoring it", path)
                weights = None
            elif state is not None:
                install_autoencoder(state, weights, digest=digest, scale=scale, state_dir=None)
    if weights is None:
        return None
    autoencoder = build_autoencoder(cfg)
    autoencoder.load_state_dict(weights)
    return LatentCodec(autoencoder, scale)


def site_latents(cfg: ExperimentConfig, dataset: Dataset, *, key: tuple, digest: str, scale: float,
                 load_codec: Callable[[], Optional[LatentCodec]]) -> Optional[LatentDataset]:
    """``dataset`` encoded by the autoencoder ``digest`` at ``scale``, once per (site, split,
    autoencoder, scale) in this process; ``load_codec`` is called only to encode. None when the
    site does not hold that autoencoder."""
    full = (*key, digest, float(scale))
    if full not in _LATENTS:
        codec = load_codec()
        if codec is None:
            return None
        if len(_LATENTS) >= 8:
            _LATENTS.pop(next(iter(_LATENTS)))
        _LATENTS[full] = encode_dataset(codec, dataset, batch_size=max(1, cfg.autoencoder.batch_size),
                                        device=resolve_device(cfg.train.device))
    return _LATENTS[full]
