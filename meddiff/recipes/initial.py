"""Starting a run from a checkpoint (``train.init_from``): pre-trained weights, typically from
public data, loaded before round 1 of a federated or DP study, or step 1 of a centralized run.

Public pre-training followed by DP fine-tuning is what makes DP diffusion models usable
(Ghalebikesabi et al. 2023; Daum et al. 2024). The initial weights are public by assumption: the
privacy guarantee covers the sites' data only, and says so in every record of the run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from configs import ExperimentConfig
from meddiff.checkpoint import check_finite, load_checkpoint
from meddiff.nets.trainable import adapter_keys
from meddiff.recipes.phases import trained_phase

#: What every record of a run started from ``init_from`` says about those weights.
PUBLIC_NOTE = ("the initial weights come from this file; the data it was trained on is outside the sites' DP guarantee, "
               "which needs none if that data is public")
#: The file a run directory keeps the initial weights' record in.
RECORD_FILE = "init_from.json"


@dataclass(frozen=True)
class InitialWeights:
    """The weights a run starts from: the denoiser's (EMA when the checkpoint has them) and, for
    latent diffusion, the autoencoder's; ``None`` where the checkpoint holds none."""

    path: str
    sha256: str
    unet: Optional[dict[str, torch.Tensor]]
    autoencoder: Optional[dict[str, torch.Tensor]]

    def record(self) -> dict[str, Any]:
        """Plain data for ``init_from.json``, checkpoints and the privacy report."""
        return {"path": self.path, "sha256": self.sha256, "unet": self.unet is not None,
                "autoencoder": self.autoencoder is not None, "note": PUBLIC_NOTE}

    def write_record(self, run_dir: Path) -> Path:
        path = Path(run_dir) / RECORD_FILE
        path.write_text(json.dumps(self.record(), indent=2))
        return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_initial_weights(cfg: ExperimentConfig) -> Optional[InitialWeights]:
    """The checkpoint named by ``train.init_from`` (None when unset); a clear error naming the
    file when it is missing, unreadable or holds non-finite weights."""
    source = cfg.train.init_from
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    ckpt = load_checkpoint(path)
    payload = ckpt.extra.get("autoencoder")
    autoencoder = dict(payload["state"]) if isinstance(payload, Mapping) and "state" in payload else None
    unet = None if trained_phase(ckpt.extra).produces_codec else dict(ckpt.ema if ckpt.ema is not None else ckpt.model)
    for name, state in (("denoiser", unet), ("autoencoder", autoencoder)):
        if state is not None:
            check_finite(state, f"train.init_from: {path} ({name})")
    return InitialWeights(str(path.resolve()), file_sha256(path), unet, autoencoder)


def start_from(model: nn.Module, phase, initial: Optional[InitialWeights]) -> bool:
    """Load ``phase``'s share of ``initial`` into ``model`` (see :func:`load_into`); False when
    there is none (no ``init_from``, or a checkpoint without that phase's weights)."""
    state = phase.initial_state(initial) if initial is not None else None
    if state is not None:
        load_into(model, state, f"train.init_from: {initial.path} ({phase.name})", may_lack=adapter_keys(model))
    return state is not None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, may_lack: Iterable[str] = ()) -> None:
    """Load ``state`` into ``model`` or refuse, naming the missing, unexpected and differently
    shaped keys (a checkpoint of another architecture). Keys in ``may_lack`` (low-rank adapters
    added for fine-tuning) keep the model's values when ``state`` has none."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(may_lack))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{label} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys]
        raise ValueError(f"{source}: its weights do not fit this config's model: " + "; ".join(parts)
                         + "; check model.* / autoencoder.* against the checkpoint's config")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
