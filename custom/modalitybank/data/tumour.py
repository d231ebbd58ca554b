"""Synthetic brain tumours in BraTS labels (1 necrosis / non-enhancing core, 2 edema,
4 enhancing tumour).

Shapes are level sets of (anisotropic distance / radius + smooth Gaussian random-field noise),
so no two tumours are alike and none is a ball; the edema spreads preferentially along white
matter, as vasogenic edema does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import random_rotation, smooth_field

#: Whole-tumour radius range (mm) per tumour kind.
RADIUS_MM: dict[str, tuple[float, float]] = {"HGG": (15.0, 35.0), "LGG": (8.0, 20.0)}


@dataclass
class Tumour:
    """A tumour on the case grid: hard labels plus soft (partial-volume) weights for rendering."""

    kind: str  # "HGG" or "LGG"
    seg: np.ndarray  # uint8, BraTS labels
    soft: dict[int, np.ndarray]  # label -> float32 weight in [0, 1], weights sum to <= 1
    texture: np.ndarray  # float32 smooth field ~N(0, 1): heterogeneity inside the lesion
    centre: np.ndarray  # voxel coordinates
    radius_mm: float


def pick_centre(
    wm: np.ndarray,
    brain: np.ndarray,
    mni_mm: np.ndarray,
    spacing_mm: float,
    radius_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A voxel in cerebral white matter of one hemisphere, deep enough for the tumour core.

    ``mni_mm`` (3, *shape) gives each voxel's position in the undeformed MNI frame, so "cerebral"
    (above the tentorium, off the midline) is judged on the atlas, not on the deformed grid."""
    depth = ndi.distance_transform_edt(brain) * spacing_mm
    x, y, z = mni_mm
    cerebral = (np.abs(x) > 15) & (z > 0) & (z < 55) & (y > -75) & (y < 45)
    for need_wm, need_depth in ((0.8, 0.6 * radius_mm), (0.6, 0.4 * radius_mm), (0.5, 0.0)):
        ok = cerebral & (wm > need_wm) & (depth > need_depth)
        if ok.any():
            cand = np.argwhere(ok)
            return cand[rng.integers(len(cand))].astype(np.float64)
    raise RuntimeError("no white matter to place a tumour in")


def _local_box(centre: np.ndarray, half: int, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.round(centre).astype(int) - half, 0)
    hi = np.minimum(np.round(centre).astype(int) + half + 1, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), lo


def _radial(p: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Anisotropic distance (voxels) from the origin: a randomly oriented ellipsoid metric with
    axis ratios ~exp(N(0, spread)), volume-preserving."""
    axes = np.exp(rng.normal(0.0, spread, 3))
    axes /= np.cbrt(axes.prod())
    rot = random_rotation(rng, 90.0)
    q = np.einsum("ij,j...->i...", (rot / axes[None, :]).T, p)
    return np.sqrt((q**2).sum(0))


def _component_at(mask: np.ndarray, point: tuple[int, ...]) -> np.ndarray:
    """The connected component of ``mask`` containing ``point`` (or the largest one)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    k = lab[point]
    if k == 0:
        k = int(np.bincount(lab.ravel())[1:].argmax()) + 1
    return lab == k


def make_tumour(
    kind: str,
    centre: np.ndarray,
    probs: np.ndarray,
    brain: np.ndarray,
    spacing_mm: float,
    rng: np.random.Generator,
    radius_mm: float | None = None,
) -> Tumour:
    """Lay a tumour of ``kind`` ("HGG": necrosis 1, enhancing rim 4, edema 2; "LGG":
    non-enhancing core 1, edema 2) at ``centre`` into tissue fractions ``probs`` (CSF, GM, WM).

    Work happens in a box around the centre; labels are clipped to the brain, and the core
    and its rim are retried a few times if the grid is too coarse for every label to show."""
    if kind not in RADIUS_MM:
        raise ValueError(f"unknown tumour kind {kind!r}")
    s = spacing_mm
    r_wt = float(radius_mm if radius_mm is not None else rng.uniform(*RADIUS_MM[kind]))
    half = int(np.ceil(2.2 * r_wt / s)) + 2
    box, lo = _local_box(centre, half, brain.shape)
    bshape = tuple(sl.stop - sl.start for sl in box)
    p = np.indices(bshape, dtype=np.float64) + lo[:, None, None, None] - centre[:, None, None, None]
    c_loc = tuple(int(round(v)) for v in centre - lo)
    in_brain = brain[box]
    csf, _, wm = probs[(slice(None), *box)]

    # edema: a larger, more irregular level set that prefers white matter and avoids CSF
    noise_ed = 0.7 * smooth_field(bshape, rng, 9.0 / s)[0] + 0.45 * smooth_field(bshape, rng, 4.5 / s)[0]
    phi_ed = _radial(p, rng, 0.25) * s / r_wt + rng.uniform(0.18, 0.3) * noise_ed
    phi_ed -= rng.uniform(0.35, 0.6) * (wm - 0.5)
    edema = (phi_ed < 1.0) & in_brain & (csf < 0.6)

    core_frac = rng.uniform(0.5, 0.75) if kind == "HGG" else rng.uniform(0.5, 0.8)
    rim_mm = rng.uniform(2.5, 6.0)
    for attempt in range(6):
        r_core = r_wt * core_frac * (1.0 + 0.15 * attempt)
        noise_c = smooth_field(bshape, rng, max(0.35 * r_core, 4.0) / s)[0]
        phi_c = _radial(p, rng, 0.2) * s / r_core + rng.uniform(0.2, 0.35) * noise_c
        core = _component_at((phi_c < 1.0) & in_brain, c_loc)
        labels = np.zeros(bshape, dtype=np.uint8)
        if kind == "HGG":
            # necrosis: the core minus an enhancing rim whose thickness varies smoothly along
            # the lesion (rim_mm x (1 +- 50 %)), never thinner than one voxel
            noise_n = smooth_field(bshape, rng, max(0.3 * r_core, 3.0) / s)[0]
            rim = rim_mm * np.clip(1.0 + 0.5 * noise_n, 0.4, 2.0)
            necrosis = ndi.distance_transform_edt(core) * s > np.maximum(rim, s)
            labels[core] = 4
            labels[necrosis] = 1
        else:
            labels[core] = 1
        whole = _component_at(edema | core, c_loc)
        labels[~whole] = 0
        labels[whole & (labels == 0)] = 2
        wanted = (1, 2, 4) if kind == "HGG" else (1, 2)
        if all((labels == k).sum() >= 3 for k in wanted):
            break
        edema = edema | ndi.binary_dilation(core, iterations=2) & in_brain

    seg = np.zeros(brain.shape, dtype=np.uint8)
    seg[box] = labels
    soft: dict[int, np.ndarray] = {}
    for k in (1, 2, 4):
        if (labels == k).any():
            w = np.zeros(brain.shape, dtype=np.float32)
            w[box] = ndi.gaussian_filter((labels == k).astype(np.float32), 0.35)
            soft[k] = w
    total = sum(soft.values()) if soft else None
    if total is not None:
        scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
        soft = {k: w * scale * brain for k, w in soft.items()}
    texture = np.zeros(brain.shape, dtype=np.float32)
    texture[box] = smooth_field(bshape, rng, 5.0 / s)[0]
    return Tumour(kind, seg, soft, texture, centre, r_wt)
