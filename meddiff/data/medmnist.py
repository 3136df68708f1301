"""Reader for the MedMNIST v2 ``.npz`` layout (Yang et al., Scientific Data 2023).

Keys: ``{train,val,test}_images`` and ``{train,val,test}_labels``. Images are uint8
``[N, H, W]`` (2-D grey), ``[N, H, W, 3]`` (2-D RGB) or ``[N, D, H, W]`` (3-D); labels are
``[N, 1]`` (multi-class) or ``[N, L]`` (multi-label).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def read_medmnist_npz(path: str | Path, split: str = "train", *, spatial_dims: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Load one split.

    Args:
        path: the ``.npz`` file.
        split: ``train``, ``val`` or ``test``.
        spatial_dims: 2 for 2-D datasets (grey or RGB), 3 for the 3-D ones, None to infer it from
            the array (``[N,H,W]`` and ``[N,H,W,1|3]`` are 2-D, other ``[N,D,H,W]`` 3-D).
    Returns:
        ``images`` uint8 channels-first, ``[N, C, H, W]`` or ``[N, 1, D, H, W]``, and ``labels``
        int64 ``[N]`` (the first label column).
    Raises:
        FileNotFoundError / ValueError naming the file and the problem.
    """
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            ik, lk = f"{split}_images", f"{split}_labels"
            found = {k: npz[k] for k in (ik, lk) if k in keys}
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, a pickle or a bare .npy ...
        raise ValueError(f"{path}: cannot read as a MedMNIST .npz archive (numpy could not open it: "
                         f"{type(exc).__name__}); check that the file is complete and in the MedMNIST v2 layout") from None
    missing = [k for k in (ik, lk) if k not in found]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(keys)} (not a MedMNIST .npz?)")
    images, labels = found[ik], found[lk]
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).reshape(len(images), -1).any(axis=1).sum())
        raise ValueError(f"{path}: {bad} image(s) of {split}_images contain NaN or Inf")
    if images.dtype.kind not in "uif":
        raise ValueError(f"{path}: {split}_images has dtype {images.dtype}; expected numbers")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {split}_images has {len(images)} items but {split}_labels has {len(labels)}")
    if spatial_dims is None:
        spatial_dims = 2 if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3)) else 3
    if spatial_dims == 2:
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):
            images = np.moveaxis(images, -1, 1)
        else:
            raise ValueError(f"{path}: {split}_images has shape {images.shape}; expected [N,H,W] or [N,H,W,3] for 2-D")
    elif spatial_dims == 3:
        if images.ndim != 4:
            raise ValueError(f"{path}: {split}_images has shape {images.shape}; expected [N,D,H,W] for 3-D")
        images = images[:, None]
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64)
    return np.ascontiguousarray(images), labels
