"""The anatomy of a procedural phantom as a tissue label map, and its rendering in several contrasts.

One draw of a subject (:func:`draw_anatomy`) gives a label map of scalp, skull, subarachnoid CSF,
folded cortex, white matter, deep grey nuclei, lateral ventricles and falx, a smooth tissue texture
and, optionally, a tumour (oedema, enhancing rim, necrotic core). Every contrast
(:data:`CONTRASTS`: ``t1``, ``t2``, ``ct``) is a look-up of that one label map, so the contrasts of a
subject are aligned pixel for pixel. Deterministic in the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: Tissue labels of the map, in label order (0 = air outside the head).
TISSUES = ("air", "scalp", "bone", "csf", "gm", "wm", "deep_gm", "falx")

#: Mask channels of a phantom: the brain, then the tumour sub-regions in BraTS order (necrotic core
#: = BraTS label 1, oedema = 2, enhancing tumour = 3); the sub-regions are disjoint.
MASK_CHANNELS = ("brain", "necrotic", "oedema", "enhancing")


@dataclass(frozen=True)
class Contrast:
    """Intensities of one imaging contrast.

    Attributes:
        tissue: intensity of each of :data:`TISSUES`.
        texture: amplitude of the brain's low-frequency texture (contrast units).
        oedema: ``(scale, shift)``: oedema is the underlying tissue's value times scale plus shift.
        enhancing: intensity of the enhancing rim.
        necrotic: intensity of the necrotic core.
        clip: output range, or None to leave it open (CT in HU).
    """

    tissue: dict = field(default_factory=dict)
    texture: float = 0.0
    oedema: tuple[float, float] = (1.0, 0.0)
    enhancing: float = 0.0
    necrotic: float = 0.0
    clip: tuple[float, float] | None = (0.0, 1.0)


# T1-like tissue intensities in [0, 1].
_T1 = {"scalp": 0.72, "bone": 0.06, "csf": 0.16, "gm": 0.50, "wm": 0.82, "deep_gm": 0.60, "falx": 0.30}

# T2-weighted (spin echo, TE ~ 100 ms) in [0, 1]: signal ~ PD * exp(-TE / T2). With T2 ~ 69 ms in
# white matter and ~ 99 ms in grey matter at 3 T (Stanisz et al. 2005, MRM 54:507) and > 1 s in CSF,
# CSF is brightest, grey matter ~ 1.4x white matter, deep grey nuclei between (iron shortens T2),
# cortical bone and dura (falx) dark, scalp (fat, bright on fast spin echo) intermediate. Oedema and
# fluid-filled necrosis have long T2 (bright); the cellular enhancing rim is intermediate-high.
_T2 = {"scalp": 0.55, "bone": 0.03, "csf": 0.95, "gm": 0.45, "wm": 0.32, "deep_gm": 0.38, "falx": 0.12}

# Non-contrast head CT in Hounsfield units (textbook values): air -1000, subcutaneous fat and skin
# of the scalp -100..+40 (mixed), cortical bone +700..+1500, CSF 0..15, white matter 20..30, grey
# matter 35..45, dura 50..70. Oedema is ~10 HU hypodense to its tissue, a cellular tumour rim
# slightly hyperdense, a necrotic core near fluid.
_CT = {"scalp": -30.0, "bone": 1000.0, "csf": 8.0, "gm": 40.0, "wm": 25.0, "deep_gm": 38.0, "falx": 60.0}

CONTRASTS: dict[str, Contrast] = {
    "t1": Contrast(tissue={"air": 0.0, **_T1}, texture=0.02, oedema=(0.72, 0.0), enhancing=0.97, necrotic=0.25),
    "t2": Contrast(tissue={"air": 0.0, **_T2}, texture=0.015, oedema=(1.0, 0.35), enhancing=0.62, necrotic=0.85),
    "ct": Contrast(tissue={"air": -1000.0, **_CT}, texture=2.0, oedema=(1.0, -10.0), enhancing=45.0, necrotic=15.0,
                   clip=None),
}

#: Contrasts measured in Hounsfield units (not in [0, 1]).
HU_CONTRASTS = ("ct",)


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / ax) ** 2 + (v / ay) ** 2


def _smooth_texture(rng, n, scale):
    noise = rng.standard_normal((n, n))
    tex = ndimage.gaussian_filter(noise, sigma=n / 16.0)
    return scale * tex / (tex.std() + 1e-8)


def _head_frame(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict:
    """Subject pose and head shape: rotated coordinates ``xr, yr``, the head's semi-axes ``ax, ay``,
    the normalised radius ``r`` (1 at the scalp) and the polar angle ``phi``."""
    angle = rng.uniform(-0.15, 0.15)
    cx, cy = rng.uniform(-0.04, 0.04, size=2)
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    ax, ay = rng.uniform(0.70, 0.80), rng.uniform(0.84, 0.94)
    return {"xr": xr, "yr": yr, "ax": ax, "ay": ay, "r": np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2),
            "phi": np.arctan2(yr / ay, xr / ax)}


def _tissue_labels(head: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scalp, skull, CSF, folded cortex, white matter, deep grey nuclei, ventricles and falx as
    indices into :data:`TISSUES`; returns ``(labels [n, n] uint8, brain mask [n, n])``."""
    xr, yr, r, phi = head["xr"], head["yr"], head["r"], head["phi"]
    label = {name: i for i, name in enumerate(TISSUES)}
    # Folded cortex: the grey/white boundary and the pial surface wobble with the polar angle.
    k = np.arange(5, 13)
    amp = rng.uniform(0.0, 0.035, size=k.size)
    phase = rng.uniform(0, 2 * np.pi, size=k.size)
    folds = (amp[:, None, None] * np.cos(k[:, None, None] * phi[None] + phase[:, None, None])).sum(0)
    cortex = rng.uniform(0.10, 0.15)
    pial = 0.83 + 0.3 * folds
    wm_edge = pial - cortex + 1.2 * folds

    labels = np.zeros(r.shape, np.uint8)
    labels[r <= 1.0] = label["scalp"]
    labels[r <= 0.93] = label["bone"]
    labels[r <= 0.87] = label["csf"]
    labels[r <= pial] = label["gm"]
    labels[r <= wm_edge] = label["wm"]
    for side in (-1, 1):  # deep grey nuclei (thalamus / basal ganglia)
        labels[_ellipse(xr, yr, side * 0.20, 0.08, 0.10, 0.15, side * 0.3) <= 1] = label["deep_gm"]
    # Lateral ventricles: paired, slightly splayed, size varies with the subject (age, atrophy).
    vs = rng.uniform(0.7, 1.4)
    vy = rng.uniform(-0.12, -0.02)
    for side in (-1, 1):
        labels[_ellipse(xr, yr, side * 0.075 * vs, vy, 0.055 * vs, 0.24 * vs, -side * 0.25) <= 1] = label["csf"]
    # Falx cerebri: a thin midline line outside the ventricles.
    brain = r <= pial
    falx = (np.abs(xr) < 0.012) & brain & ((yr < vy - 0.26 * vs) | (yr > vy + 0.30 * vs))
    labels[falx] = label["falx"]
    return labels, brain


def _tumour_regions(brain: np.ndarray, head: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A tumour inside the brain parenchyma: boolean ``oedema``, ``tumour`` (enhancing rim and
    core) and ``necrotic`` maps (``brain``'s shape)."""
    xr, yr, ax, ay = head["xr"], head["yr"], head["ax"], head["ay"]
    for _ in range(20):
        lr, la = rng.uniform(0.15, 0.55), rng.uniform(0, 2 * np.pi)
        lx, ly = lr * np.cos(la) * ax, lr * np.sin(la) * ay
        if abs(lx) > 0.12:
            break
    radius = rng.uniform(0.08, 0.17)
    d = np.sqrt((xr - lx) ** 2 + (yr - ly) ** 2)
    theta = np.arctan2(yr - ly, xr - lx)
    wobble = 1 + 0.15 * np.cos(3 * theta + rng.uniform(0, 6.3)) + 0.08 * np.cos(5 * theta + rng.uniform(0, 6.3))
    rr = d / (radius * wobble)
    inside = brain & (rr <= 1.7)
    oedema, tumour = inside & (rr > 1.0), brain & (rr <= 1.0)
    necrotic = brain & (rr <= rng.uniform(0.45, 0.7))
    return {"oedema": oedema, "tumour": tumour, "necrotic": necrotic}


def _majority(masks: list[np.ndarray], size: int, supersample: int) -> np.ndarray:
    """Disjoint supersampled boolean regions ``[n, n]`` to ``[len(masks), size, size]``: each pixel
    takes the region (or the background) that covers most of its sub-pixels, so the regions stay
    disjoint (the label counterpart of the image's box average)."""
    fractions = np.stack([m.reshape(size, supersample, size, supersample).mean(axis=(1, 3)) for m in masks])
    winner = np.argmax(np.concatenate([1.0 - fractions.sum(0, keepdims=True), fractions]), axis=0)
    return winner[None] == np.arange(1, len(masks) + 1)[:, None, None]


@dataclass(frozen=True)
class Anatomy:
    """One subject drawn at ``size * supersample`` pixels per side: tissue ``labels`` and ``brain``
    ``[n, n]``, the unit-free ``texture`` ``[n, n]`` (drawn at the T1 amplitude) and the tumour's
    ``regions`` (empty without a tumour)."""

    labels: np.ndarray
    brain: np.ndarray
    texture: np.ndarray
    regions: dict
    size: int
    supersample: int

    def render(self, contrast: str) -> np.ndarray:
        """The subject in one of :data:`CONTRASTS`: ``[size, size]`` float32, box-averaged from the
        supersampled grid (anti-aliasing); in [0, 1] for MR contrasts, in HU for CT."""
        if contrast not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; choose one of {sorted(CONTRASTS)}")
        c = CONTRASTS[contrast]
        lut = np.array([c.tissue[t] for t in TISSUES], dtype=np.float64)
        img = lut[self.labels]
        img = img + self.brain * (self.texture * (c.texture / CONTRASTS["t1"].texture))
        if self.regions:
            oedema = self.regions["oedema"]
            img[oedema] = img[oedema] * c.oedema[0] + c.oedema[1]
            img[self.regions["tumour"]] = c.enhancing
            img[self.regions["necrotic"]] = c.necrotic
        s, k = self.size, self.supersample
        img = img.reshape(s, k, s, k).mean(axis=(1, 3))
        if c.clip is not None:
            img = np.clip(img, *c.clip)
        return img.astype(np.float32)

    def masks(self) -> np.ndarray:
        """``[len(MASK_CHANNELS), size, size]`` uint8 in {0, 1}: the brain and the disjoint tumour
        sub-regions (majority of sub-pixels)."""
        r = self.regions
        empty = np.zeros_like(self.brain)
        sub = {"necrotic": r["necrotic"], "oedema": r["oedema"], "enhancing": r["tumour"] & ~r["necrotic"]} if r else {}
        tumour = _majority([sub.get(c, empty) for c in MASK_CHANNELS[1:]], self.size, self.supersample)
        return np.concatenate([_majority([self.brain], self.size, self.supersample), tumour]).astype(np.uint8)

    def tissues(self) -> np.ndarray:
        """``[size, size]`` uint8 indices into :data:`TISSUES` (the healthy tissue under any tumour),
        each pixel the tissue covering most of its sub-pixels."""
        regions = _majority([self.labels == i for i in range(1, len(TISSUES))], self.size, self.supersample)
        return (regions * np.arange(1, len(TISSUES))[:, None, None]).sum(0).astype(np.uint8)


def draw_anatomy(size: int, rng: np.random.Generator, *, lesion: bool, supersample: int = 2) -> Anatomy:
    """Draw one subject's anatomy (and a tumour when ``lesion``) from ``rng``; see :class:`Anatomy`."""
    n = size * supersample
    lin = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")
    head = _head_frame(x, y, rng)
    labels, brain = _tissue_labels(head, rng)
    texture = _smooth_texture(rng, n, CONTRASTS["t1"].texture)  # low-frequency tissue texture, brain only
    regions = _tumour_regions(brain, head, rng) if lesion else {}
    return Anatomy(labels, brain, texture, regions, size, supersample)
