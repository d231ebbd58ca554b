"""BraTS 2018 loader: case discovery, validation, slice extraction, an on-disk slice cache and
one :class:`SiteDataset` per hospital site.

Layout read (the project's phantom writes the same one, real BraTS 2018 has it)::

    root/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz     (``.nii`` accepted too)
    root/splits.json                                                  optional: {"train": [...], "test": [...]}

Package modality names are ``t1, t1c, t2, flair`` (:data:`modalitybank.config.MODALITIES`); the file
suffix of each is in :data:`modalitybank.config.MODALITY_SUFFIX` (``t1c`` is stored as ``t1ce``).
The data centre of a case is read from its id (:func:`centre_of`).

Every problem with the data raises :class:`BratsDataError` whose message names the full path of the
offending file (or folder) and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .. import config

__all__ = [
    "BratsDataError",
    "CaseRecord",
    "SiteDataset",
    "SliceCache",
    "centre_of",
    "extract_slices",
    "load_case",
    "scan_cases",
    "site_datasets",
    "source_dataset",
    "split_cases",
]

#: Grade folders of the BraTS 2018 layout.
GRADES: tuple[str, ...] = ("HGG", "LGG")
#: Name of the optional split file in the data root.
SPLITS_FILE = "splits.json"
#: File extensions accepted, in order of preference.
_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
#: Bumped whenever extract_slices changes what it computes, so old cache entries are not reused.
_CACHE_FORMAT = 1
_SPLITS = ("train", "test", "all")

_CENTRE_RE = re.compile(r"^brats_?\d{2,4}_(?P<tag>cbica|tcia|2013)", re.IGNORECASE)


class BratsDataError(ValueError):
    """A problem with BraTS-layout data; the message names the file (full path) and the problem."""


# ----------------------------------------------------------------------------------------------
# Case discovery
# ----------------------------------------------------------------------------------------------


def centre_of(case_id: str) -> str:
    """Data centre of a BraTS case id: ``"CBICA"``, ``"TCIA"`` or ``"Other"``.

    ``Brats18_CBICA_AAB_1`` -> CBICA, ``Brats18_TCIA01_131_1`` -> TCIA, ``Brats18_2013_10_1`` -> Other;
    BraTS 2019/2020 style ids (``BraTS19_CBICA_AAA_1``, ``BraTS20_..``) follow the same rule. Any other
    id (including ``BraTS20_Training_001``) is ``"Other"``.
    """
    m = _CENTRE_RE.match(case_id)
    if m is None:
        return "Other"
    tag = m.group("tag").upper()
    return tag if tag in ("CBICA", "TCIA") else "Other"


@dataclass(frozen=True)
class CaseRecord:
    """One case folder.

    ``files`` maps each modality name present (``t1``, ``t1c``, ``t2``, ``flair``) and ``"seg"`` to its
    file; a modality whose file is absent is simply not a key (:func:`load_case` then reports it).
    """

    case_id: str
    grade: str
    centre: str
    folder: Path
    files: dict[str, Path] = field(hash=False, compare=True)

    def expected_file(self, key: str) -> Path:
        """Where the file of modality ``key`` (or ``"seg"``) would be, ``.nii.gz`` form."""
        suffix = "seg" if key == "seg" else config.MODALITY_SUFFIX[key]
        return self.folder / f"{self.case_id}_{suffix}{_EXTENSIONS[0]}"


def _find_file(folder: Path, case_id: str, suffix: str) -> Path | None:
    for ext in _EXTENSIONS:
        p = folder / f"{case_id}_{suffix}{ext}"
        if p.is_file():
            return p
    return None


def _case_folders(grade_dir: Path) -> list[Path]:
    return sorted(p for p in grade_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_cases(root: str | os.PathLike[str], grades: Sequence[str] = ("HGG",)) -> list[CaseRecord]:
    """All cases under ``root/<grade>/`` for each grade, sorted by case id.

    Raises :class:`BratsDataError` if ``root`` or a grade folder is missing, if no case is found, if
    a case folder has no segmentation file, or if a case id appears twice.
    """
    root = Path(root).expanduser().resolve()
    if isinstance(grades, str):
        grades = (grades,)
    if not root.is_dir():
        raise BratsDataError(f"{root}: data root does not exist or is not a folder")
    records: dict[str, CaseRecord] = {}
    for grade in grades:
        grade_dir = root / grade
        if not grade_dir.is_dir():
            raise BratsDataError(f"{grade_dir}: grade folder {grade!r} is missing")
        for folder in _case_folders(grade_dir):
            case_id = folder.name
            seg = _find_file(folder, case_id, "seg")
            if seg is None:
                raise BratsDataError(
                    f"{folder}: case folder has no segmentation file ({case_id}_seg.nii.gz or .nii)"
                )
            files: dict[str, Path] = {}
            for mod in config.MODALITIES:
                p = _find_file(folder, case_id, config.MODALITY_SUFFIX[mod])
                if p is not None:
                    files[mod] = p
            files["seg"] = seg
            if case_id in records:
                raise BratsDataError(f"{folder}: case id {case_id!r} also found in {records[case_id].folder}")
            records[case_id] = CaseRecord(case_id, grade, centre_of(case_id), folder, files)
    if not records:
        raise BratsDataError(f"{root}: no case folders found under grade folder(s) {list(grades)}")
    return [records[k] for k in sorted(records)]


def _all_case_ids_on_disk(root: Path) -> set[str]:
    ids: set[str] = set()
    for grade in GRADES:
        if (root / grade).is_dir():
            ids.update(p.name for p in _case_folders(root / grade))
    return ids


def _read_splits(root: Path) -> dict[str, list[str]] | None:
    path = root / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BratsDataError(f"{path}: cannot read split file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise BratsDataError(f"{path}: split file must be a JSON object {{'train': [...], 'test': [...]}}")
    out: dict[str, list[str]] = {}
    for key in ("train", "test"):
        ids = data.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BratsDataError(f"{path}: {key!r} must be a list of case id strings")
        out[key] = ids
    both = sorted(set(out["train"]) & set(out["test"]))
    if both:
        raise BratsDataError(f"{path}: case ids listed in both train and test: {both[:10]}")
    on_disk = _all_case_ids_on_disk(root)
    unknown = sorted((set(out["train"]) | set(out["test"])) - on_disk)
    if unknown:
        raise BratsDataError(
            f"{path}: {len(unknown)} case id(s) listed do not exist under {root}/{{HGG,LGG}}: {unknown[:10]}"
        )
    return out


def split_cases(
    records: Sequence[CaseRecord],
    root: str | os.PathLike[str],
    split: str,
    n_test: int = 40,
    seed: int = 0,
) -> list[CaseRecord]:
    """The records of ``split`` (``"train"``, ``"test"`` or ``"all"``), sorted by case id.

    With ``root/splits.json`` present its lists decide (every id listed must exist on disk under
    ``root/{HGG,LGG}``, else :class:`BratsDataError`; records listed in neither list belong to
    ``"all"`` only). Without it, a deterministic random split: ``n_test`` cases (capped to
    ``len(records) // 5``), drawn with ``numpy.random.default_rng(seed)`` from the records sorted by
    id, are the test set and the rest the training set.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(_SPLITS)}")
    root = Path(root).expanduser().resolve()
    recs = sorted(records, key=lambda r: r.case_id)
    splits = _read_splits(root)
    if split == "all":
        return recs
    if splits is not None:
        wanted = set(splits[split])
        return [r for r in recs if r.case_id in wanted]
    n = min(max(int(n_test), 0), len(recs) // 5)
    order = np.random.default_rng(seed).permutation(len(recs))
    test_idx = set(order[:n].tolist())
    return [r for i, r in enumerate(recs) if (i in test_idx) == (split == "test")]


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def _read_nifti(path: Path, what: str, *, as_float: bool) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file; reads the whole data block so truncation is caught."""
    if not path.is_file():
        raise BratsDataError(f"missing file {path} ({what})")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise TypeError(f"not a NIfTI image but {type(img).__name__}")
        if as_float:
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.array(np.asanyarray(img.dataobj))
        affine = np.asarray(img.affine, dtype=np.float64)
    except BratsDataError:
        raise
    except Exception as e:  # nibabel ImageFileError, gzip.BadGzipFile, EOFError, zlib.error, OSError, ...
        raise BratsDataError(
            f"{path}: corrupt, truncated or not a NIfTI file ({what}): {type(e).__name__}: {e}"
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:  # (H, W, D, 1) as some tools write it
        data = data[..., 0]
    if data.ndim != 3:
        raise BratsDataError(f"{path}: expected a 3D volume ({what}), got shape {tuple(data.shape)}")
    return data, affine


def load_case(
    record: CaseRecord, modalities: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Read and validate one case.

    Returns ``(images, seg, affine)``: ``images[m]`` float32 ``(H, W, D)`` for each ``m`` in
    ``modalities``; ``seg`` uint8 ``(H, W, D)`` with values in {0, 1, 2, 4}; ``affine`` float64
    ``(4, 4)`` (the segmentation's).

    Raises :class:`BratsDataError` naming the file for: a missing file, a corrupt / truncated /
    non-NIfTI file, a volume that is not 3D, a shape differing from the segmentation's, labels
    outside {0, 1, 2, 4}, non-finite image values.
    """
    modalities = _check_modalities(modalities)
    seg_path = record.files.get("seg", record.expected_file("seg"))
    seg_raw, affine = _read_nifti(seg_path, f"segmentation of case {record.case_id}", as_float=False)
    if not np.issubdtype(seg_raw.dtype, np.integer):
        bad = ~np.isfinite(seg_raw)
        if bad.any():
            raise BratsDataError(f"{seg_path}: segmentation has {int(bad.sum())} non-finite values")
        frac = seg_raw != np.round(seg_raw)
        if frac.any():
            shown = np.unique(seg_raw[frac])[:10].tolist()
            raise BratsDataError(f"{seg_path}: labels outside {{0,1,2,4}} present (non-integer): {shown}")
    values = np.unique(seg_raw)
    bad_values = [v.item() for v in values if v.item() not in config.BRATS_LABELS]
    if bad_values:
        shown = [int(v) if float(v).is_integer() else v for v in bad_values[:10]]
        raise BratsDataError(
            f"{seg_path}: labels outside {{0,1,2,4}} present: {shown} (allowed: {list(config.BRATS_LABELS)})"
        )
    seg = seg_raw.astype(np.uint8)

    images: dict[str, np.ndarray] = {}
    for mod in modalities:
        path = record.files.get(mod)
        if path is None:
            raise BratsDataError(
                f"case {record.case_id}: missing file {record.expected_file(mod)} (modality {mod})"
            )
        data, _ = _read_nifti(path, f"modality {mod} of case {record.case_id}", as_float=True)
        if data.shape != seg.shape:
            raise BratsDataError(
                f"{path}: shape {tuple(data.shape)} (modality {mod}) differs from the segmentation "
                f"{seg_path} shape {tuple(seg.shape)}"
            )
        finite = np.isfinite(data)
        if not finite.all():
            raise BratsDataError(
                f"{path}: {int((~finite).sum())} non-finite values (NaN/inf) in image (modality {mod})"
            )
        images[mod] = np.ascontiguousarray(data, dtype=np.float32)
    return images, seg, affine


def _check_modalities(modalities: Iterable[str]) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    mods = tuple(modalities)
    if not mods:
        raise ValueError("at least one modality is needed")
    unknown = [m for m in mods if m not in config.MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality name(s) {unknown}; choose from {list(config.MODALITIES)}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"duplicate modality names in {list(mods)}")
    return mods


# ----------------------------------------------------------------------------------------------
# Slice extraction
# ----------------------------------------------------------------------------------------------


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
) -> dict[str, np.ndarray]:
    """Axial tumour slices of one case, normalised and resized.

    ``images[m]``: (H, W, D) per modality; ``seg``: (H, W, D). A slice ``k`` (last axis) is kept if
    its tumour area (``seg > 0``) is non-zero and at least ``min_tumour_fraction`` of its brain area
    (brain = any of ``modalities`` > 0). With ``max_slices > 0`` at most that many, evenly spaced
    among the kept ones (deterministic).

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
    ) -> dict[str, np.ndarray]:
        """``extract_slices(*load_case(record, modalities)[:2], ...)``, from the cache when valid."""
        modalities = _check_modalities(modalities)
        key = self.key(record, modalities, image_size, min_tumour_fraction, max_slices)
        path = self.path(record, key)
        cached = self._read(path, len(modalities), int(image_size))
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        images, seg, _ = load_case(record, modalities)
        out = extract_slices(images, seg, modalities, image_size, min_tumour_fraction, max_slices)
        self._write(path, out)
        return out


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class SiteDataset(torch.utils.data.Dataset):
    """The tumour slices of one hospital site (one data centre), with only the modalities it holds.

    ``centre=None`` takes all centres. All cases are loaded eagerly (through a :class:`SliceCache`
    when ``cache_dir`` is given) into contiguous tensors:

    * ``images``: (N, C, S, S) float32 in [-1, 1], channels in the order of ``modalities``
    * ``labels``: (N, S, S) uint8 in {0, 1, 2, 4};  ``brains``: (N, S, S) uint8 in {0, 1}
    * ``slice_case``: (N,) int64 index into ``case_ids``;  ``slice_index``: (N,) int64 axial index

    ``dataset[i]`` is ``{"image": (C, S, S) float32, "label": (S, S) uint8, "brain": (S, S) uint8}``.
    Attributes ``modalities`` (tuple), ``records`` and ``case_ids`` (the cases of this site and split,
    sorted), ``centre``, ``split``, ``root``. Raises :class:`BratsDataError` if there is no slice.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        centre: str | None,
        modalities: Sequence[str],
        split: str = "train",
        grades: Sequence[str] = ("HGG",),
        image_size: int = 64,
        min_tumour_fraction: float = 0.01,
        max_slices_per_case: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        n_test: int = 40,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if centre is not None and centre not in config.CENTRES:
            raise ValueError(f"unknown centre {centre!r}; choose one of {list(config.CENTRES)} or None")
        self.root = Path(root).expanduser().resolve()
        self.centre = centre
        self.split = split
        self.modalities: tuple[str, ...] = _check_modalities(modalities)
        self.image_size = int(image_size)
        all_records = scan_cases(self.root, grades)
        chosen = split_cases(all_records, self.root, split, n_test=n_test, seed=seed)
        self.records: list[CaseRecord] = [r for r in chosen if centre is None or r.centre == centre]
        self.case_ids: list[str] = [r.case_id for r in self.records]
        cache = SliceCache(cache_dir) if cache_dir is not None else None

        it: Iterable[CaseRecord] = self.records
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(self.records, desc=f"slices {centre or 'all'}/{split}", unit="case")
        parts: list[dict[str, np.ndarray]] = []
        for rec in it:
            if cache is not None:
                out = cache.get(rec, self.modalities, self.image_size, min_tumour_fraction, max_slices_per_case)
            else:
                images, seg, _ = load_case(rec, self.modalities)
                out = extract_slices(
                    images, seg, self.modalities, self.image_size, min_tumour_fraction, max_slices_per_case
                )
            parts.append(out)
        n = sum(len(p["slice_index"]) for p in parts)
        if n == 0:
            raise BratsDataError(
                f"{self.root}: no tumour slices for centre {centre or 'all'}, split {split!r}, grades "
                f"{list(grades)} ({len(self.records)} case(s), min_tumour_fraction {min_tumour_fraction})"
            )
        cat = lambda k: np.concatenate([p[k] for p in parts if len(p["slice_index"])], axis=0)  # noqa: E731
        self.images = torch.from_numpy(np.ascontiguousarray(cat("image")))
        self.labels = torch.from_numpy(np.ascontiguousarray(cat("label")))
        self.brains = torch.from_numpy(np.ascontiguousarray(cat("brain")))
        self.slice_index = torch.from_numpy(cat("slice_index").astype(np.int64))
        self.slice_case = torch.from_numpy(
            np.concatenate([np.full(len(p["slice_index"]), i, dtype=np.int64) for i, p in enumerate(parts)])
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "brain": self.brains[i]}

    def __repr__(self) -> str:
        return (
            f"SiteDataset(centre={self.centre!r}, split={self.split!r}, modalities={list(self.modalities)}, "
            f"cases={len(self.case_ids)}, slices={len(self)}, size={self.image_size})"
        )


def _slice_kwargs(scale: str, kw: dict[str, Any]) -> dict[str, Any]:
    sl = config.preset(scale)["slices"]
    out: dict[str, Any] = {
        "image_size": sl["image_size"],
        "min_tumour_fraction": sl["min_tumour_fraction"],
        "max_slices_per_case": sl["max_slices_per_case"],
    }
    out.update(kw)  # explicit keyword arguments override the preset
    return out


def site_datasets(
    root: str | os.PathLike[str],
    experiment: str,
    scale: str,
    split: str = "train",
    cache_dir: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> dict[str, SiteDataset]:
    """One :class:`SiteDataset` per site of ``experiment`` (``config.experiment(name)["sites"]``:
    site -> modalities; the site name is its data centre), sized by ``config.preset(scale)["slices"]``.
    Extra keyword arguments go to :class:`SiteDataset` (and override the preset's slice figures)."""
    exp = config.experiment(experiment)
    if "sites" not in exp:
        raise ValueError(f"experiment {experiment!r} defines no sites")
    centres = exp.get("centres", {})
    args = _slice_kwargs(scale, kw)
    return {
        site: SiteDataset(root, centres.get(site, site), mods, split=split, cache_dir=cache_dir, **args)
        for site, mods in exp["sites"].items()
    }


def source_dataset(
    root: str | os.PathLike[str],
    scale: str,
    cache_dir: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> SiteDataset:
    """The pre-training source set: ``config.experiment("pretrain")`` (grade LGG, modality t1c),
    all centres, split ``"all"``, sized by ``config.preset(scale)["slices"]``."""
    pre = config.experiment("pretrain")
    args = _slice_kwargs(scale, kw)
    args.setdefault("grades", (pre["grade"],))
    args.setdefault("split", "all")
    return SiteDataset(root, None, [pre["modality"]], cache_dir=cache_dir, **args)
