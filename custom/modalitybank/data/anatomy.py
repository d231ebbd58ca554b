"""Real anatomy for the phantom: the MNI152 2009 template that nilearn ships, put on a
BraTS-like grid once per spacing, then deformed per case.

The per-case deformation (smooth random displacement + small random affine, and later the
tumour's mass effect) is what stops a generator from memorising one brain: every case has
its own anatomy around the tumour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

#: BraTS volumes are 240 x 240 x 155 voxels of 1 mm.
BRATS_EXTENT_MM: tuple[int, int, int] = (240, 240, 155)
#: Channels of :attr:`Template.maps`, in order.
MAP_NAMES: tuple[str, ...] = ("t1", "csf", "gm", "wm", "brain")
#: Values of the tissue label map returned by :func:`tissue_labels`.
TISSUE_LABELS: dict[str, int] = {"background": 0, "csf": 1, "gm": 2, "wm": 3}


@lru_cache(maxsize=1)
def _mni_1mm() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 2009 maps at 1 mm, stacked as MAP_NAMES, and their affine (loaded once)."""
    from nilearn import datasets  # imported lazily: nilearn is slow to import

    def load(fn) -> np.ndarray:
        return np.asarray(fn(resolution=1).dataobj, dtype=np.float32)

    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    brain = ndi.binary_fill_holes(load(datasets.load_mni152_brain_mask) > 0.5).astype(np.float32)
    gm = load(datasets.load_mni152_gm_template) * brain  # the brain is skull-stripped: nothing outside
    wm = load(datasets.load_mni152_wm_template) * brain
    csf = np.clip(brain - gm - wm, 0.0, None)
    return np.stack([t1 * brain, csf, gm, wm, brain]), np.asarray(t1_img.affine, dtype=np.float64)


@dataclass(frozen=True)
class Template:
    """The MNI anatomy resampled onto a BraTS-like grid of one spacing."""

    spacing: float
    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> world (mm, RAS, MNI frame)
    maps: np.ndarray  # (len(MAP_NAMES), *shape) float32
    t1_tissue_means: tuple[float, float, float]  # template T1 value in pure CSF, GM, WM

    def map(self, name: str) -> np.ndarray:
        return self.maps[MAP_NAMES.index(name)]


def grid_shape(spacing_mm: float) -> tuple[int, int, int]:
    """BraTS' 240 x 240 x 155 mm field of view at ``spacing_mm``."""
    return tuple(int(round(e / spacing_mm)) for e in BRATS_EXTENT_MM)  # type: ignore[return-value]


@lru_cache(maxsize=4)
def template(spacing_mm: float) -> Template:
    """The MNI maps on the BraTS-like grid at ``spacing_mm``: brain centred in x/y, z cropped to
    the brain's extent, centred. Computed once per spacing; all heavy per-case work then happens
    at this resolution, never at 1 mm unless the spacing is 1 mm."""
    maps_1mm, affine_1mm = _mni_1mm()
    s = float(spacing_mm)
    shape = grid_shape(s)
    idx = np.argwhere(maps_1mm[-1] > 0.5)
    centre_1mm = (idx.min(0) + idx.max(0)) / 2.0
    offset = centre_1mm - (np.asarray(shape) - 1) / 2.0 * s  # output voxel i -> input offset + s*i
    sigma = 0.42 * np.sqrt(max(s * s - 1.0, 0.0))  # anti-alias before going coarser
    out = np.empty((len(MAP_NAMES), *shape), dtype=np.float32)
    for k, m in enumerate(maps_1mm):
        src = ndi.gaussian_filter(m, sigma) if sigma > 0 else m
        out[k] = ndi.affine_transform(src, np.full(3, s), offset=offset, output_shape=shape, order=1)
    affine = np.diag([s, s, s, 1.0])
    affine[:3, 3] = affine_1mm[:3, :3] @ offset + affine_1mm[:3, 3]
    pure = [(maps_1mm[k] > 0.9) & (maps_1mm[-1] > 0.5) for k in (1, 2, 3)]
    means = tuple(float(maps_1mm[0][p].mean()) for p in pure)
    return Template(s, shape, affine, out, means)  # type: ignore[arg-type]


def _bspline_basis(n: int, cell: float) -> np.ndarray:
    """(n, m) cubic B-spline weights: voxel i of an axis from m lattice values ``cell`` voxels apart,
    rows scaled so that i.i.d. unit lattice values give unit variance at every voxel."""
    t = np.arange(n) / cell + 1.0
    m = int(np.floor((n - 1) / cell)) + 4
    x = np.abs(t[:, None] - np.arange(m)[None, :])
    b = np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))
    return (b / np.sqrt((b**2).sum(1, keepdims=True))).astype(np.float32)


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cell_vox: float, n: int = 1) -> np.ndarray:
    """``n`` smooth random fields of unit variance, (n, *shape) float32: i.i.d. Gaussian values on a
    lattice ``cell_vox`` voxels apart, interpolated by a separable cubic B-spline (cheap at any
    resolution: a few matrix products, no per-voxel spline evaluation)."""
    bases = [_bspline_basis(d, max(cell_vox, 1.0)) for d in shape]
    coarse = rng.standard_normal((n, *[b.shape[1] for b in bases])).astype(np.float32)
    out = np.einsum("nabc,ia->nibc", coarse, bases[0])
    out = np.einsum("nibc,jb->nijc", out, bases[1])
    return np.ascontiguousarray(np.einsum("nijc,kc->nijk", out, bases[2]))


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation by up to ``max_deg`` degrees about each axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Deformation:
    """Maps output voxels to template voxels: q = centre + A (p - centre) + d(p)."""

    matrix: np.ndarray  # (3, 3)
    centre: np.ndarray  # (3,)
    displacement: np.ndarray  # (3, *shape) float32, in voxels

    def coords(self) -> np.ndarray:
        """Template coordinates of every output voxel, (3, *shape) float32."""
        shape = self.displacement.shape[1:]
        p = np.indices(shape, dtype=np.float32) - self.centre.astype(np.float32)[:, None, None, None]
        q = np.einsum("ij,j...->i...", self.matrix.astype(np.float32), p)
        return q + self.centre.astype(np.float32)[:, None, None, None] + self.displacement

    def at(self, points: np.ndarray) -> np.ndarray:
        """Template coordinates of arbitrary output positions ``points`` (3, ...)."""
        c = self.centre.reshape(3, *([1] * (points.ndim - 1)))
        q = np.einsum("ij,j...->i...", self.matrix, points - c) + c
        d = np.stack(
            [ndi.map_coordinates(self.displacement[k], points, order=1, mode="nearest") for k in range(3)]
        )
        return (q + d).astype(np.float32)


def random_deformation(
    shape: tuple[int, int, int],
    spacing_mm: float,
    rng: np.random.Generator,
    amplitude_mm: float = 3.0,
    max_scale: float = 0.08,
    max_rotation_deg: float = 6.0,
) -> Deformation:
    """A random smooth deformation: per-axis scale within +-``max_scale``, rotation within
    +-``max_rotation_deg`` about each axis, and a smooth displacement of ~``amplitude_mm``
    at two length scales (40 mm and 20 mm)."""
    scale = 1.0 + rng.uniform(-max_scale, max_scale, 3)
    matrix = random_rotation(rng, max_rotation_deg) @ np.diag(scale)
    amp = amplitude_mm * rng.uniform(0.6, 1.4) / spacing_mm
    coarse = smooth_field(shape, rng, 40.0 / spacing_mm, 3) * amp
    fine = smooth_field(shape, rng, 20.0 / spacing_mm, 3) * (0.5 * amp)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    return Deformation(matrix, centre, coarse + fine)


def mass_effect(
    coords: np.ndarray, deform: Deformation, centre: np.ndarray, strength: float, sigma_vox: float
) -> np.ndarray:
    """Compose ``deform`` with a radial push of tissue away from ``centre`` (output voxels).

    The output voxel p samples the deformed anatomy at c + (p - c)(1 - g(r)), g(r) = k exp(-r^2 /
    2 sigma^2), k < 1: tissue near the tumour is pushed outwards, the push decays with distance,
    and the radial map stays monotonic (no folding). Only a box of 3 sigma around c changes."""
    shape = coords.shape[1:]
    half = int(np.ceil(3.0 * sigma_vox))
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    p = np.indices(tuple(hi - lo), dtype=np.float64) + lo[:, None, None, None]
    v = p - centre[:, None, None, None]
    g = strength * np.exp(-(v**2).sum(0) / (2.0 * sigma_vox**2))
    src = centre[:, None, None, None] + v * (1.0 - g)
    out = coords.copy()
    out[(slice(None), *box)] = deform.at(src)
    return out


def resample(template_maps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample stacked template maps at template coordinates ``coords`` (linear, 0 outside)."""
    return np.stack(
        [ndi.map_coordinates(m, coords, order=1, mode="constant", cval=0.0) for m in template_maps]
    )


def tissue_probabilities(csf: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CSF, GM, WM fractions that sum to 1 inside the brain mask and are 0 outside it."""
    p = np.stack([csf, gm, wm]).clip(0.0, None)
    total = p.sum(0)
    p = np.where(total > 1e-3, p / np.maximum(total, 1e-3), np.array([1.0, 0.0, 0.0])[:, None, None, None])
    return (p * brain).astype(np.float32)


def tissue_labels(probs: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Hard tissue label map (see TISSUE_LABELS) from CSF/GM/WM fractions."""
    return np.where(brain, probs.argmax(0) + 1, 0).astype(np.uint8)
