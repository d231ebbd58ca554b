"""MRI contrasts and per-centre scanner styles.

Contrasts: relative intensities per tissue and tumour compartment for T1, T1c, T2 and FLAIR,
mixed by partial volume, plus the real MNI T1 template's texture (mapped to each contrast) so
the images carry real anatomical detail. Styles: each data centre has its own intensity curve,
bias field, noise and blur, fixed by the centre's name, with small per-case jitter; this is
the domain shift between hospitals that the method has to live with.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from .anatomy import smooth_field

#: Relative intensity (WM of T1 ~ 0.8) of each tissue / tumour compartment per modality.
#: "necrosis" is HGG label 1, "core" the non-enhancing core of LGG (also label 1).
# fmt: off
CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"csf": 0.22, "gm": 0.55, "wm": 0.80, "edema": 0.45, "necrosis": 0.24, "enhancing": 0.56, "core": 0.38},
    "t1c": {"csf": 0.22, "gm": 0.55, "wm": 0.78, "edema": 0.45, "necrosis": 0.18, "enhancing": 1.10, "core": 0.34},
    "t2": {"csf": 1.00, "gm": 0.55, "wm": 0.38, "edema": 0.80, "necrosis": 0.92, "enhancing": 0.62, "core": 0.85},
    "flair": {"csf": 0.10, "gm": 0.55, "wm": 0.40, "edema": 0.95, "necrosis": 0.50, "enhancing": 0.78, "core": 0.72},
}
# fmt: on
#: Share of the MNI template's texture in each modality (the rest is the tissue mixture).
TEXTURE_WEIGHT: dict[str, float] = {"t1": 0.3, "t1c": 0.3, "t2": 0.2, "flair": 0.2}


@dataclass(frozen=True)
class ScannerStyle:
    """How one centre's scanners render a relative image into stored intensities."""

    gamma: float  # intensity curve: out ~ in ** gamma
    max_intensity: float  # stored value of relative intensity 1.0
    bias: float  # std of the smooth multiplicative bias field (fraction)
    bias_length_mm: float  # correlation length of the bias field
    noise: float  # Rician noise std, fraction of max_intensity
    blur_mm: float  # in-plane Gaussian blur sigma (mm)
    blur_z_mm: float  # through-plane blur sigma (mm): thick slices

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in asdict(self).items()}


#: The fixed styles: CBICA sharp and clean, TCIA a strong bias field and a bright curve,
#: Other (BraTS 2013 centres) noisy and blurry (thick slices); "public" is the LGG pre-training source.
# fmt: off
STYLES: dict[str, ScannerStyle] = {
    "CBICA": ScannerStyle(gamma=1.0, max_intensity=1400.0, bias=0.04, bias_length_mm=100.0, noise=0.015, blur_mm=0.0, blur_z_mm=0.0),
    "TCIA": ScannerStyle(gamma=0.8, max_intensity=1900.0, bias=0.13, bias_length_mm=90.0, noise=0.03, blur_mm=0.6, blur_z_mm=1.0),
    "Other": ScannerStyle(gamma=1.3, max_intensity=900.0, bias=0.06, bias_length_mm=100.0, noise=0.045, blur_mm=1.0, blur_z_mm=2.5),
    "public": ScannerStyle(gamma=1.1, max_intensity=1200.0, bias=0.05, bias_length_mm=100.0, noise=0.025, blur_mm=0.4, blur_z_mm=0.8),
}
# fmt: on


def centre_style(centre: str) -> ScannerStyle:
    """The style of ``centre``: from STYLES, or, for an unknown name, drawn from a generator
    seeded by the name's CRC32 (so a centre always scans the same way, whatever the seed)."""
    if centre in STYLES:
        return STYLES[centre]
    r = np.random.default_rng(zlib.crc32(centre.encode()))
    return ScannerStyle(
        gamma=float(r.uniform(0.75, 1.35)),
        max_intensity=float(r.uniform(800, 2000)),
        bias=float(r.uniform(0.03, 0.18)),
        bias_length_mm=float(r.uniform(60, 100)),
        noise=float(r.uniform(0.01, 0.07)),
        blur_mm=float(r.uniform(0.0, 1.0)),
        blur_z_mm=float(r.uniform(0.0, 2.5)),
    )


def jitter(style: ScannerStyle, rng: np.random.Generator) -> ScannerStyle:
    """The centre's style with a small per-case variation (scanners drift, protocols vary)."""
    return replace(
        style,
        gamma=style.gamma * rng.uniform(0.95, 1.05),
        max_intensity=style.max_intensity * rng.uniform(0.9, 1.1),
        bias=style.bias * rng.uniform(0.8, 1.2),
        noise=style.noise * rng.uniform(0.85, 1.15),
        blur_mm=style.blur_mm * rng.uniform(0.85, 1.15),
        blur_z_mm=style.blur_z_mm * rng.uniform(0.85, 1.15),
    )


def relative_image(
    modality: str,
    probs: np.ndarray,
    t1_template: np.ndarray,
    t1_tissue_means: tuple[float, float, float],
    tumour_soft: dict[int, np.ndarray],
    tumour_texture: np.ndarray,
    tumour_kind: str,
) -> np.ndarray:
    """Noise-free relative image of one modality: partial-volume tissue mixture, template
    texture, then the tumour compartments blended in by their soft weights."""
    c = CONTRASTS[modality]
    tissue_means = [c["csf"], c["gm"], c["wm"]]
    mix = np.einsum("t...,t->...", probs, np.asarray(tissue_means, dtype=np.float32))
    # the template's T1 value mapped through (CSF, GM, WM) -> this modality's means
    texture = np.interp(t1_template, t1_tissue_means, tissue_means).astype(np.float32)
    w = TEXTURE_WEIGHT[modality]
    img = (1.0 - w) * mix + w * texture * (probs.sum(0) > 0)
    if 2 in tumour_soft:  # edema: tissue soaked with water, with heterogeneous strength
        strength = tumour_soft[2] * np.clip(0.85 + 0.12 * tumour_texture, 0.6, 1.0)
        img = img * (1.0 - strength) + c["edema"] * strength
    core_name = "necrosis" if tumour_kind == "HGG" else "core"
    for label, name in ((1, core_name), (4, "enhancing")):
        if label in tumour_soft:
            value = c[name] * (1.0 + 0.08 * tumour_texture)
            img = img * (1.0 - tumour_soft[label]) + value * tumour_soft[label]
    return img.astype(np.float32)


def make_bias_field(
    shape: tuple[int, ...], style: ScannerStyle, spacing_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth unit-variance field at the style's bias length; ``scan`` scales it by style.bias."""
    return smooth_field(shape, rng, style.bias_length_mm / spacing_mm)[0]


def scan(
    relative: np.ndarray,
    brain: np.ndarray,
    style: ScannerStyle,
    spacing_mm: float,
    rng: np.random.Generator,
    bias_field: np.ndarray | None = None,
) -> np.ndarray:
    """Render a relative image as a centre's scanner would store it (int16, skull-stripped):
    intensity curve, blur, smooth multiplicative bias, Rician noise, background exactly 0.

    ``bias_field`` (unit-variance smooth field, see :func:`make_bias_field`) is shared by the
    modalities of one session, since it comes mostly from the receive coil; drawn if None."""
    img = style.max_intensity * np.clip(relative, 0.0, None) ** style.gamma
    sigma_vox = np.array([style.blur_mm, style.blur_mm, style.blur_z_mm]) / spacing_mm
    if sigma_vox.max() > 0.02:
        img = ndi.gaussian_filter(img, sigma_vox)
    if bias_field is None:
        bias_field = make_bias_field(img.shape, style, spacing_mm, rng)
    img = img * np.clip(1.0 + style.bias * bias_field, 0.3, None)
    sigma = style.noise * style.max_intensity
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)  # magnitude of complex Gaussian noise: Rician
    img = np.where(brain, np.clip(np.round(img), 1, 32767), 0)
    return img.astype(np.int16)
