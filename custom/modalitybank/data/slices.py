"""Slices of a BraTS case for 2D training: tumour-slice selection, per-volume intensity
normalisation, resizing, and an on-disk cache of the result per case."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .brats_cases import CaseRecord, _check_modalities, load_case

__all__ = ["SliceCache", "extract_slices", "normalise_volume", "resize_slices"]

#: Bumped whenever extract_slices changes what it computes, so old cache entries are not reused.
_CACHE_FORMAT = 1

# ----------------------------------------------------------------------------------------------
# Slice extraction
# ----------------------------------------------------------------------------------------------


#: A tumour-free slice is a training slice only if its brain is at least this fraction of the case's largest.
MIN_BACKGROUND_BRAIN = 0.05


def resize_slices(x: np.ndarray, size: int | tuple[int, int], *, nearest: bool) -> np.ndarray:
    """Resize ``x`` (N, C, H, W) to (N, C, *size); nearest for labels, antialiased for images."""
    n, c, h, w = x.shape
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if n == 0:
        return np.zeros((0, c, th, tw), dtype=x.dtype)
    if (h, w) == (th, tw):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if nearest:
        out = F.interpolate(t, size=(th, tw), mode="nearest-exact")
    elif th <= h and tw <= w:
        out = F.interpolate(t, size=(th, tw), mode="area")
    elif th >= h and tw >= w:
        out = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False)
    else:  # shrinking along one axis, enlarging along the other
        out = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return out.numpy()


def normalise_volume(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Intensity normalisation of one modality volume (H, W, D) -> float32 (H, W, D) in [-1, 1].

    Inside ``brain``: divide by the 99.5th percentile of the brain voxels, clip to [0, 1], map to
    [-1, 1]. Outside: -1.
    """
    out = np.full(volume.shape, -1.0, dtype=np.float32)
    if not brain.any():
        return out
    vals = volume[brain]
    scale = float(np.percentile(vals, 99.5))
    if not np.isfinite(scale) or scale <= 0:
        scale = float(vals.max()) if vals.max() > 0 else 1.0
    out[brain] = np.clip(vals / scale, 0.0, 1.0) * 2.0 - 1.0
    return out


def extract_slices(
    images: dict[str, np.ndarray],
    seg: np.ndarray,
    modalities: Sequence[str],
    image_size: int,
    min_tumour_fraction: float,
    max_slices: int = 0,
    background_slices: int = 0,
) -> dict[str, np.ndarray]:
    """Axial tumour slices of one case (and, optionally, tumour-free ones), normalised and resized.

    ``images[m]``: (H, W, D) per modality; ``seg``: (H, W, D). A slice ``k`` (last axis) is kept if
    its tumour area (``seg > 0``) is non-zero and at least ``min_tumour_fraction`` of its brain area
    (brain = any of ``modalities`` > 0). With ``max_slices > 0`` at most that many, evenly spaced
    among the kept ones (deterministic). With ``background_slices > 0``, also that many tumour-free
    slices, evenly spaced over the case's brain slices (those with at least
    :data:`MIN_BACKGROUND_BRAIN` of the largest brain area): a generator that synthesises whole
    volumes must have seen the slices above and below the tumour too.

    Returns ``{"image": (N, C, S, S) float32 in [-1, 1] (C = len(modalities), in that order;
    background -1), "label": (N, S, S) uint8 in {0, 1, 2, 4}, "brain": (N, S, S) uint8 in {0, 1},
    "slice_index": (N,) int64}`` with ``S = image_size``.
    """
    modalities = _check_modalities(modalities)
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = int(image_size)
    missing = [m for m in modalities if m not in images]
    if missing:
        raise ValueError(f"images lack modalities {missing}")
    seg = np.asarray(seg)
    for m in modalities:
        if images[m].shape != seg.shape or seg.ndim != 3:
            raise ValueError(f"modality {m} shape {images[m].shape} differs from seg shape {seg.shape}")

    brain = np.zeros(seg.shape, dtype=bool)
    for m in modalities:
        brain |= images[m] > 0
    tumour_area = (seg > 0).sum(axis=(0, 1))
    brain_area = brain.sum(axis=(0, 1))
    keep = (tumour_area > 0) & (brain_area > 0) & (tumour_area >= min_tumour_fraction * brain_area)
    idx = np.flatnonzero(keep)
    if max_slices and max_slices > 0 and len(idx) > max_slices:
        pick = np.round(np.linspace(0, len(idx) - 1, int(max_slices))).astype(np.int64)
        idx = idx[pick]
    if background_slices > 0:
        free = np.flatnonzero((tumour_area == 0) & (brain_area >= MIN_BACKGROUND_BRAIN * brain_area.max()))
        if len(free) > background_slices:
            free = free[np.round(np.linspace(0, len(free) - 1, int(background_slices))).astype(np.int64)]
        idx = np.sort(np.concatenate([idx, free]))

    if len(idx) == 0:
        return {
            "image": np.zeros((0, len(modalities), size, size), dtype=np.float32),
            "label": np.zeros((0, size, size), dtype=np.uint8),
            "brain": np.zeros((0, size, size), dtype=np.uint8),
            "slice_index": np.zeros((0,), dtype=np.int64),
        }

    # normalise per volume (percentile over the whole brain), then take the kept slices: (N, C, H, W)
    chans = [np.moveaxis(normalise_volume(images[m], brain)[:, :, idx], -1, 0) for m in modalities]
    img = np.stack(chans, axis=1)
    img = np.clip(resize_slices(img, size, nearest=False), -1.0, 1.0).astype(np.float32)
    lab = np.moveaxis(seg[:, :, idx], -1, 0)[:, None].astype(np.float32)
    lab = resize_slices(lab, size, nearest=True)[:, 0].round().astype(np.uint8)
    brn = np.moveaxis(brain[:, :, idx], -1, 0)[:, None].astype(np.float32)
    brn = (resize_slices(brn, size, nearest=True)[:, 0] > 0.5).astype(np.uint8)
    return {
        "image": np.ascontiguousarray(img),
        "label": np.ascontiguousarray(lab),
        "brain": np.ascontiguousarray(brn),
        "slice_index": idx.astype(np.int64),
    }


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

_CACHE_KEYS = ("image", "label", "brain", "slice_index")


class SliceCache:
    """Caches :func:`extract_slices` results per case as ``.npz`` files under ``cache_dir``.

    The key hashes the case id, the paths, sizes and modification times of the files read (the
    requested modalities and the segmentation), the modalities, ``image_size``,
    ``min_tumour_fraction`` and ``max_slices``; changing any file therefore recomputes. Unreadable
    or inconsistent entries are recomputed; writes are atomic (temporary file + ``os.replace``), so
    several processes may share one cache folder. ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(
        self,
        record: CaseRecord,
        modalities: Sequence[str],
        image_size: int,
        min_tumour_fraction: float,
        max_slices: int = 0,
        background_slices: int = 0,
    ) -> str:
        files = []
        for k in (*modalities, "seg"):
            p = record.files.get(k, record.expected_file(k))
            try:
                st = p.stat()
                files.append([k, str(p.resolve()), st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([k, str(p), None, None])
        payload = json.dumps(
            {
                "format": _CACHE_FORMAT,
                "case": record.case_id,
                "files": files,
                "modalities": list(modalities),
                "image_size": int(image_size),
                "min_tumour_fraction": float(min_tumour_fraction),
                "max_slices": int(max_slices),
                **({"background_slices": int(background_slices)} if background_slices else {}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, record: CaseRecord, key: str) -> Path:
        return self.cache_dir / f"{record.case_id}-{key[:20]}.npz"

    def _read(self, path: Path, n_chan: int, size: int) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: np.array(z[k]) for k in _CACHE_KEYS}
        except Exception:  # truncated / garbage / missing keys: recompute
            return None
        n = len(out["slice_index"])
        ok = (
            out["image"].shape == (n, n_chan, size, size)
            and out["image"].dtype == np.float32
            and out["label"].shape == (n, size, size)
            and out["label"].dtype == np.uint8
            and out["brain"].shape == (n, size, size)
            and out["brain"].dtype == np.uint8
        )
        return out if ok else None

    def _write(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **{k: arrays[k] for k in _CACHE_KEYS})
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get(
        self,
        record: CaseRecord,
        modalities: Sequence[str],
        image_size: int,
        min_tumour_fraction: float,
        max_slices: int = 0,
        background_slices: int = 0,
    ) -> dict[str, np.ndarray]:
        """``extract_slices(*load_case(record, modalities)[:2], ...)``, from the cache when valid."""
        modalities = _check_modalities(modalities)
        key = self.key(record, modalities, image_size, min_tumour_fraction, max_slices, background_slices)
        path = self.path(record, key)
        cached = self._read(path, len(modalities), int(image_size))
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        images, seg, _ = load_case(record, modalities)
        out = extract_slices(images, seg, modalities, image_size, min_tumour_fraction, max_slices, background_slices)
        self._write(path, out)
        return out


