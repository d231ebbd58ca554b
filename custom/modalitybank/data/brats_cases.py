"""BraTS 2018 cases on disk: discovery, data centre from the case id, train/test split, and
loading with validation (every problem a :class:`BratsDataError` naming the file)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import config

__all__ = [
    "BratsDataError",
    "CaseRecord",
    "centre_of",
    "check_labels",
    "load_case",
    "scan_cases",
    "split_cases",
]

#: Grade folders of the BraTS 2018 layout.
GRADES: tuple[str, ...] = ("HGG", "LGG")
#: Name of the optional split file in the data root.
SPLITS_FILE = "splits.json"
#: File extensions accepted, in order of preference.
_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
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


def scan_cases(root: str | os.PathLike[str], grades: Sequence[str] = ("HGG",),
               suffixes: dict[str, str] | None = None) -> list[CaseRecord]:
    """All cases under ``root/<grade>/`` for each grade, sorted by case id.

    ``suffixes`` maps modality names to file-name suffixes (``<case>_<suffix>.nii.gz``) where a
    site's files are not named as BraTS names them (:data:`modalitybank.config.MODALITY_SUFFIX`).
    Raises :class:`BratsDataError` if ``root`` or a grade folder is missing, if no case is found, if
    a case folder has no segmentation file, or if a case id appears twice.
    """
    suffixes = {**config.MODALITY_SUFFIX, **(suffixes or {})}
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
                p = _find_file(folder, case_id, suffixes[mod])
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


def check_labels(seg: np.ndarray, path: Path) -> None:
    """Raise :class:`BratsDataError` naming ``path`` if ``seg`` holds anything but BraTS labels {0, 1, 2, 4}."""
    if not np.issubdtype(seg.dtype, np.integer):
        bad = ~np.isfinite(seg)
        if bad.any():
            raise BratsDataError(f"{path}: segmentation has {int(bad.sum())} non-finite values")
        frac = seg != np.round(seg)
        if frac.any():
            shown = np.unique(seg[frac])[:10].tolist()
            raise BratsDataError(f"{path}: labels outside {{0,1,2,4}} present (non-integer): {shown}")
    bad_values = [v.item() for v in np.unique(seg) if v.item() not in config.BRATS_LABELS]
    if bad_values:
        shown = [int(v) if float(v).is_integer() else v for v in bad_values[:10]]
        raise BratsDataError(
            f"{path}: labels outside {{0,1,2,4}} present: {shown} (allowed: {list(config.BRATS_LABELS)})"
        )


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
    check_labels(seg_raw, seg_path)
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

