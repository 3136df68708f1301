"""Translating source images with a trained translation model, and reading/writing the files of
``meddiff translate``.

A diffusion translator samples the target with the config's sampler (DDIM) from ``x_T ~ N(0, I)``
given the source, and averages ``samples`` draws; the regression baseline is one forward pass.
NIfTI volumes are normalised as in training (MR: percentiles to [-1, 1]), reoriented to RAS, cut
into slices along ``data.slice_axis`` (2-D model) or taken whole (3-D), each padded to a square and
resized to the model's side, translated, and mapped back through the exact inverse geometry, so
the output has the input's shape, affine and orientation. Outputs are in the target's unit: HU
for CT (:func:`meddiff.data.paired.model_to_hu`), [0, 1] for MR.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs import ExperimentConfig
from meddiff.data.paired import hu_to_model, model_to_hu
from meddiff.data.phantom_anatomy import HU_CONTRASTS
from meddiff.data.transforms import percentile_normalise
from meddiff.device import autocast_dtype, autocast_factory
from meddiff.recipes.build import build_diffusion, build_sampler
from meddiff.sampling import generate


def require_codec(cfg: ExperimentConfig, codec) -> None:
    """A clear error when a latent translation model is run without its autoencoder."""
    if cfg.autoencoder.enabled and codec is None:
        raise ValueError("a latent translation model works in latents: pass its autoencoder (codec) to encode the source "
                         "and decode the translation")


@torch.no_grad()
def sample_translation(model, cfg: ExperimentConfig, source: torch.Tensor, *, samples: int = 1, seed: int = 0,
                       device="cpu", batch: int = 64, codec=None) -> torch.Tensor:
    """The mean of ``samples`` DDIM translations of ``source [N, C_s, *S]`` in [-1, 1]: ``[N, C, *S]``.
    With latent diffusion (``codec``) the source is encoded, each draw is a latent, decoded before
    the mean."""
    require_codec(cfg, codec)
    sampler = build_sampler(cfg.sampler, build_diffusion(cfg.diffusion))
    autocast = autocast_factory(torch.device(device), autocast_dtype(torch.device(device), cfg.train.mixed_precision))
    codec = None if codec is None else codec.to(device)
    to_image = (lambda z: z) if codec is None else codec.decode  # noqa: E731
    out = []
    for start in range(0, len(source), batch):
        chunk = source[start:start + batch].to(device)
        cond = chunk if codec is None else codec.encode(chunk)
        draws = [to_image(generate(model, sampler, shape=(len(chunk), cfg.model.in_channels, *cond.shape[2:]),
                                   num_inference_steps=cfg.sampler.num_inference_steps, guidance_scale=1.0,
                                   generator=torch.Generator().manual_seed(seed + 1000 * k + start), device=device,
                                   autocast=autocast, progress=False, cond=cond)).clamp(-1.0, 1.0) for k in range(samples)]
        out.append(torch.stack(draws).mean(0).cpu())
    return torch.cat(out)


@torch.no_grad()
def regress_translation(objective, model, source: torch.Tensor, *, device="cpu", codec=None) -> torch.Tensor:
    """The regression baseline's one-pass translation of ``source [N, C_s, *S]``: ``[N, C, *S]`` in
    [-1, 1] (latent: the source encoded and the prediction decoded by ``codec``)."""
    cond = source.to(device) if codec is None else codec.to(device).encode(source.to(device))
    pred = objective.predict(model.eval(), cond)
    return (pred if codec is None else codec.decode(pred)).clamp(-1.0, 1.0).cpu()


def to_target_unit(x: torch.Tensor | np.ndarray, target: str):
    """Model range [-1, 1] to the target's unit: HU for CT, [0, 1] for MR."""
    return model_to_hu(x) if target in HU_CONTRASTS else (x + 1.0) / 2.0


def _fit(plane: torch.Tensor, size: int) -> torch.Tensor:
    from monai.transforms import Resize, SpatialPad

    side = max(plane.shape[1:])
    padded = SpatialPad(spatial_size=(side,) * (plane.ndim - 1), mode="constant", value=-1.0)(plane)
    return torch.as_tensor(Resize(spatial_size=(size,) * (plane.ndim - 1), mode="area")(padded))


def _unfit(plane: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    from monai.transforms import CenterSpatialCrop, Resize

    side = max(shape)
    resized = Resize(spatial_size=(side,) * len(shape), mode="bilinear" if len(shape) == 2 else "trilinear")(plane)
    return torch.as_tensor(CenterSpatialCrop(roi_size=shape)(resized))


def translate_volume(translate, array: np.ndarray, cfg: ExperimentConfig, *, progress: bool = False) -> np.ndarray:
    """``array [X, Y, Z]`` (RAS, in [-1, 1]) translated slice by slice (2-D model) or whole (3-D),
    in model range, same shape. ``translate`` maps ``[N, 1, *S]`` sources to targets."""
    size = cfg.data.image_size
    vol = torch.from_numpy(np.ascontiguousarray(array, np.float32))
    if cfg.model.spatial_dims == 3:
        return _unfit(translate(_fit(vol[None], size)[None])[0], tuple(vol.shape))[0].numpy()
    axis = cfg.data.slice_axis
    planes = [torch.rot90(vol.select(axis, i), 1, (0, 1))[None] for i in range(vol.shape[axis])]
    shape = tuple(planes[0].shape[1:])
    fitted = torch.stack([_fit(p, size) for p in planes])
    out = torch.cat([translate(fitted[i:i + 16]) for i in tqdm(range(0, len(fitted), 16), desc="slices",
                                                                   disable=not progress, leave=False)])
    back = [torch.rot90(_unfit(o, shape)[0], -1, (0, 1)) for o in out]
    return torch.stack(back, dim=axis).numpy()


def translate_nifti(translate, path: Path, out_path: Path, cfg: ExperimentConfig, *, progress: bool = False) -> float:
    """Translate one NIfTI file into ``out_path`` (the input's affine, shape and orientation);
    returns the seconds it took."""
    import nibabel as nib

    t0 = time.perf_counter()
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: a 3-D volume is needed, got shape {data.shape}")
    ornt = nib.orientations.io_orientation(img.affine)
    ras = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))  # the training orientation (RAS)
    lo, hi = cfg.data.intensity_percentiles
    normalised = hu_to_model(ras) if cfg.data.source_sequence in HU_CONTRASTS else \
        np.asarray(percentile_normalise(torch.from_numpy(ras)[None], lower=lo, upper=hi))[0]  # as in training
    translated = to_target_unit(translate_volume(translate, normalised, cfg, progress=progress), cfg.data.target_sequence)
    back = nib.orientations.apply_orientation(translated, nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), ornt))
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(back, np.float32), img.affine, header), str(out_path))
    return time.perf_counter() - t0
