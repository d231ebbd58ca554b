"""A cardiac cine MRI stand-in: the non-brain pre-training source of the Table III ablation.

The paper pre-trained one of its bases on the M&Ms cardiac set (short-axis cine MRI), which
cannot be downloaded here. This module synthesises a deterministic-by-seed substitute: short
stacks (8-11 slices, 8-10 mm thick) of short-axis bSSFP-like images, each case with

* a thorax (body) outline: a perturbed ellipse, flattened at the back, subcutaneous fat and a
  chest-wall muscle layer under the skin;
* the left ventricle: a non-circular blood pool (with papillary muscles) inside a deformed
  myocardium ring whose thickness varies around it, tapering from base to apex (ED or ES phase);
* the right ventricle: a crescent wrapped around the septal side of the LV, with a thin free wall,
  ending before the apex;
* lungs (dark), the liver dome in the apical slices, spine, descending aorta, pericardial fat;
* a smooth in-plane elastic deformation, then a scanner style (intensity curve, blur, coil bias
  field, Rician noise) through :func:`modalitybank.data.scanner.scan`.

Labels, mapped onto the BraTS labels the generator's mask channels take
(:func:`modalitybank.networks.mask_channels`: one-hot of 0, 1, 2, 4 plus the "brain" mask)::

    cardiac structure          stored label   mask channel
    background / other tissue  0              label 0
    LV blood pool              1              label 1   (BraTS: necrosis / non-enhancing core)
    LV myocardium              2              label 2   (BraTS: edema)
    RV blood pool              4              label 4   (BraTS: enhancing tumour)
    body (thorax) mask         image > 0      the "brain" mask channel

The image is 0 exactly outside the body and at least 1 inside it, so the loader's brain mask
(``image > 0``, :func:`modalitybank.data.slices.extract_slices`) is the body mask.

Storage: the loaders read BraTS-layout folders, so a set is written in that layout although it
is not brain data: ``<root>/CINE/<case>/<case>_t1ce.nii.gz`` (the cine image, in the loader's
``t1c`` slot) and ``<case>_seg.nii.gz`` (the labels above), ``root/dataset.json`` describing it.
Make a set with :func:`modalitybank.data.sources.make_source` (``kind="nonbrain"``).

Every case is drawn from ``numpy.random.default_rng([seed, GROUPS["cardiac"], index])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .anatomy import smooth_field
from .scanner import ScannerStyle, jitter, make_bias_field, scan

__all__ = ["CINE_STYLE", "FOLDER", "FOV_MM", "INTENSITY", "LABELS", "MODALITY", "CardiacCase", "cardiac_case",
           "cardiac_plan", "write_cardiac_case"]

#: Stored label of each cardiac structure (BraTS label values, see the module docstring).
LABELS: dict[str, int] = {"lv": 1, "myo": 2, "rv": 4}
#: Grade folder of the set in the loader's layout.
FOLDER = "CINE"
#: The loader's modality slot the cine image is stored in (file suffix ``_t1ce``).
MODALITY = "t1c"
#: In-plane field of view (square), mm.
FOV_MM = 340.0
#: Relative bSSFP intensities: blood bright, myocardium and muscle dark, fat bright, lungs black.
INTENSITY: dict[str, float] = {"blood": 0.95, "myo": 0.22, "fat": 0.82, "muscle": 0.27, "liver": 0.34,
                               "lung": 0.035, "soft": 0.40, "bone": 0.50, "canal": 0.75}
#: The scanner style of the cine stack (no through-plane blur: 2D slices, thick and separate).
CINE_STYLE = ScannerStyle(gamma=1.0, max_intensity=1000.0, bias=0.16, bias_length_mm=140.0, noise=0.025,
                          blur_mm=0.5, blur_z_mm=0.0)


@dataclass
class CardiacCase:
    """One synthetic short-axis cine stack, in memory (arrays ``(X, Y, slices)``)."""

    image: np.ndarray  # int16, 0 outside the body
    seg: np.ndarray  # uint8 labels in {0, 1, 2, 4}
    body: np.ndarray  # bool body (thorax) mask == image > 0
    affine: np.ndarray  # voxel -> world, mm
    style: dict[str, float]
    phase: str  # "ED" or "ES"
    slice_thickness_mm: float


def _rng(seed: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _wobble(theta: np.ndarray, rng: np.random.Generator, amplitude: float, orders: Sequence[int] = (2, 3, 4)) -> np.ndarray:
    """1 + a random low-order Fourier series of the angle: a non-circular outline."""
    out = np.ones_like(theta)
    for k in orders:
        out = out + rng.uniform(0.0, amplitude) * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
    return out


def _soft(d_mm: np.ndarray, spacing: float) -> np.ndarray:
    """Partial-volume fraction inside an outline from a signed distance (mm, negative inside)."""
    return np.clip(0.5 - d_mm / spacing, 0.0, 1.0).astype(np.float32)


def _ellipse_d(x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, a: Any, b: Any, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse: (normalised radius - 1) x mean semi-axis."""
    u, v = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    ur, vr = u * c + v * s, -u * s + v * c
    a = np.maximum(a, 1e-3)
    b = np.maximum(b, 1e-3)
    return (np.hypot(ur / a, vr / b) - 1.0) * (a + b) / 2.0


def cardiac_case(seed: np.random.Generator | int | Sequence[int], spacing_mm: float = 2.0) -> CardiacCase:
    """Synthesise one short-axis cine stack at in-plane ``spacing_mm`` (see the module docstring).

    The same ``seed`` gives bit-identical arrays."""
    rng = _rng(seed)
    s = float(spacing_mm)
    n = int(round(FOV_MM / s))
    depth = int(rng.integers(8, 12))
    thick = float(rng.uniform(8.0, 10.0))
    shape = (n, n, depth)
    c = ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)
    x0, y0 = np.meshgrid(c, c, indexing="ij")  # x: patient right -> left, y: anterior -> posterior
    x0 = np.repeat(x0[..., None], depth, axis=2)
    y0 = np.repeat(y0[..., None], depth, axis=2)
    # smooth elastic in-plane deformation (coherent through the stack) and a small rotation
    warp = smooth_field(shape, rng, 60.0 / s, n=2) * np.float32(rng.uniform(2.0, 4.0))
    rot = np.deg2rad(rng.uniform(-10.0, 10.0))
    x = (np.cos(rot) * x0 - np.sin(rot) * y0 + warp[0]).astype(np.float32)
    y = (np.sin(rot) * x0 + np.cos(rot) * y0 + warp[1]).astype(np.float32)
    # base (0) -> just past the apex (1): where each slice sits along the long axis
    reach = rng.uniform(0.95, 1.12)
    f = ((np.arange(depth) + 0.3) / (depth - 0.7) * reach).astype(np.float32)[None, None, :]

    # thorax
    bx, by = rng.uniform(-10.0, 10.0, 2)
    a_body, b_body = rng.uniform(135.0, 165.0), rng.uniform(95.0, 125.0)
    theta_b = np.arctan2((y - by) / b_body, (x - bx) / a_body)
    d_body = (np.hypot((x - bx) / a_body, (y - by) / b_body) / _wobble(theta_b, rng, 0.03) - 1.0) * (a_body + b_body) / 2
    d_body = np.maximum(d_body, y - (by + rng.uniform(0.8, 0.9) * b_body))  # flat back on the table
    body = d_body < 0
    fat_t, muscle_t = rng.uniform(4.0, 14.0), rng.uniform(7.0, 14.0)

    # left ventricle: centre drifts a little from base to apex
    hx = bx + rng.uniform(15.0, 40.0) + f * rng.uniform(-8.0, 8.0)
    hy = by + rng.uniform(-45.0, -20.0) + f * rng.uniform(-8.0, 8.0)
    phase = "ED" if rng.random() < 0.5 else "ES"
    r_cav = rng.uniform(22.0, 30.0) * (rng.uniform(0.6, 0.75) if phase == "ES" else 1.0)
    wall = rng.uniform(6.0, 11.0) * (rng.uniform(1.3, 1.6) if phase == "ES" else 1.0)
    u, v = x - hx, y - hy
    theta = np.arctan2(v, u)
    psi, ecc = rng.uniform(0.0, np.pi), rng.uniform(0.85, 1.0)
    rho = np.hypot(u * np.cos(psi) + v * np.sin(psi), (-u * np.sin(psi) + v * np.cos(psi)) / ecc)
    taper_c = np.sqrt(np.clip(1.0 - (f / rng.uniform(0.82, 0.9)) ** 2, 0.0, 1.0))
    taper_e = np.sqrt(np.clip(1.0 - (f / rng.uniform(0.95, 1.0)) ** 2, 0.0, 1.0))
    thickness = wall * (1.0 + rng.uniform(0.1, 0.3) * np.cos(theta - rng.uniform(0, 2 * np.pi))
                        + rng.uniform(0.0, 0.15) * np.cos(2 * theta - rng.uniform(0, 2 * np.pi)))
    r_c = r_cav * _wobble(theta, rng, 0.06) * taper_c
    r_e = (r_cav + thickness) * _wobble(theta, rng, 0.03) * taper_e
    d_cav = np.where(taper_c > 0, rho - r_c, 1e3).astype(np.float32)
    d_epi = np.where(taper_e > 0, rho - r_e, 1e3).astype(np.float32)
    # papillary muscles: two dark blobs in the mid-ventricular blood pool (labelled blood, as in M&Ms)
    pap = np.zeros(shape, dtype=np.float32)
    mid = ((f > 0.2) & (f < 0.7)).astype(np.float32)
    for ang in (rng.uniform(0.3, 1.0), rng.uniform(1.8, 2.6)):
        px, py = hx + 0.7 * r_c.mean() * np.cos(ang) * taper_c, hy + 0.7 * r_c.mean() * np.sin(ang) * taper_c
        pap = np.maximum(pap, _soft(np.hypot(x - px, y - py) - rng.uniform(2.5, 4.5), s) * mid)

    # right ventricle: an ellipse beside the septum minus the LV, a crescent; ends before the apex
    r_e0 = r_cav + wall
    phi = np.pi + rng.uniform(0.1, 0.6)  # towards the patient's right and anterior
    taper_rv = np.sqrt(np.clip(1.0 - (f / rng.uniform(0.65, 0.85)) ** 2, 0.0, 1.0))
    rv_scale = rng.uniform(0.6, 0.8) if phase == "ES" else 1.0
    dist = r_e0 * rng.uniform(0.55, 0.8) * taper_e
    a_rv = r_e0 * rng.uniform(0.6, 0.9) * rv_scale * taper_rv
    b_rv = r_e0 * rng.uniform(1.3, 1.7) * rv_scale * taper_rv
    d_rv_ell = np.where(taper_rv > 0, _ellipse_d(x, y, hx + dist * np.cos(phi), hy + dist * np.sin(phi),
                                                 a_rv, b_rv, phi), 1e3).astype(np.float32)
    septum_gap = rng.uniform(0.5, 2.0)
    d_rv = np.maximum(d_rv_ell, -(d_epi - septum_gap))
    rv_wall_t = rng.uniform(2.5, 4.0)
    d_rv_wall = np.maximum(d_rv_ell - rv_wall_t, -(d_epi - septum_gap))  # RV myocardium (label 0)
    d_heart = np.minimum(d_epi, d_rv_wall)

    # surroundings
    liver_start = rng.uniform(0.35, 0.7)
    grow = np.sqrt(np.clip((f - liver_start) / 0.35, 0.0, 1.0))
    d_liver = np.where(grow > 0, _ellipse_d(x, y, bx - 0.35 * a_body, by + 0.1 * b_body,
                                            0.55 * a_body * grow, 0.65 * b_body * grow), 1e3)
    spine_x, spine_y, spine_r = bx + rng.uniform(-5, 5), by + 0.68 * b_body, rng.uniform(13.0, 17.0)
    d_spine = np.hypot(x - spine_x, y - spine_y) - spine_r
    d_canal = np.hypot(x - spine_x, y - spine_y - spine_r - 6.0) - 5.0
    d_aorta = np.hypot(x - spine_x - rng.uniform(18, 28), y - spine_y + spine_r + rng.uniform(2, 8)) - rng.uniform(9, 13)
    depth_in = -d_body  # depth under the skin, mm
    lungs = np.minimum(
        _ellipse_d(x, y, bx + 0.48 * a_body, by + 0.05 * b_body, 0.36 * a_body, 0.72 * b_body, rng.uniform(-0.2, 0.2)),
        _ellipse_d(x, y, bx - 0.48 * a_body, by + 0.05 * b_body, 0.36 * a_body, 0.72 * b_body, rng.uniform(-0.2, 0.2)),
    )
    lungs = np.maximum.reduce([lungs, fat_t + muscle_t + 4.0 - depth_in, 6.0 - d_heart, -d_liver + 2.0,
                               10.0 - d_spine, 6.0 - d_aorta])

    # paint the relative image, back to front, with partial volume at every edge
    tex = smooth_field(shape, rng, 6.0 / s, n=2)
    it = INTENSITY
    rel = np.full(shape, it["soft"], dtype=np.float32)
    layers: list[tuple[np.ndarray, float | np.ndarray]] = [
        (_soft(depth_in - fat_t - muscle_t, s), it["muscle"]),  # chest-wall muscle under the skin
        (_soft(depth_in - fat_t, s), it["fat"]),  # subcutaneous fat
        (_soft(lungs, s), it["lung"] * (1.0 + 0.5 * np.abs(tex[1]))),
        (_soft(d_liver, s), it["liver"]),
        (_soft(d_spine, s), it["bone"]),
        (_soft(d_canal, s), it["canal"]),
        (_soft(d_aorta, s), it["blood"]),
        (_soft(d_heart - rng.uniform(2.0, 4.0), s) * (tex[0] > 0.3), it["fat"]),  # patchy pericardial fat
        (_soft(d_heart, s), it["myo"]),
        (_soft(d_rv, s), it["blood"]),
        (_soft(d_cav, s), it["blood"]),
        (pap * _soft(d_cav, s), it["myo"] * 1.1),
    ]
    for weight, value in layers:
        rel = rel + weight * (np.float32(value) - rel)
    rel = (rel * (1.0 + 0.04 * tex[0])).astype(np.float32)

    style = jitter(CINE_STYLE, rng)
    bias = make_bias_field(shape, style, s, rng)
    image = scan(rel, body, style, s, rng, bias)

    seg = np.zeros(shape, dtype=np.uint8)
    seg[d_epi < 0] = LABELS["myo"]
    seg[d_rv < 0] = LABELS["rv"]
    seg[d_cav < 0] = LABELS["lv"]
    seg[~body] = 0
    affine = np.diag([s, s, thick, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s, -(n - 1) / 2.0 * s, -(depth - 1) / 2.0 * thick]
    return CardiacCase(image, seg, body, affine, style.as_dict(), phase, thick)


def cardiac_plan(seed: int, n: int) -> list[dict[str, Any]]:
    """The ``n`` cases of a cardiac set: ids ``CineSAX_<k>``, seeds ``[seed, GROUPS["cardiac"], k]``."""
    from .phantom import GROUPS

    return [dict(id=f"CineSAX_{i:03d}", folder=FOLDER, seed=[seed, GROUPS["cardiac"], i], split="source")
            for i in range(int(n))]


def case_files(case: dict[str, Any]) -> list[str]:
    """The files of one case of :func:`cardiac_plan`."""
    from ..config import MODALITY_SUFFIX

    return [f"{case['id']}_{MODALITY_SUFFIX[MODALITY]}.nii.gz", f"{case['id']}_seg.nii.gz"]


def write_cardiac_case(root: Path, case: dict[str, Any], spacing: float) -> list[str]:
    """Synthesise one case of :func:`cardiac_plan` and write it (temporary folder, then renamed
    into ``root/CINE/<id>``); returns its file names."""
    import os
    import shutil

    from .phantom import _save_nifti

    cc = cardiac_case(case["seed"], spacing)
    final = root / case["folder"] / case["id"]
    tmp = root / case["folder"] / f".tmp_{case['id']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    image_file, seg_file = case_files(case)
    _save_nifti(tmp / image_file, cc.image, cc.affine)
    _save_nifti(tmp / seg_file, cc.seg, cc.affine)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return [image_file, seg_file]
