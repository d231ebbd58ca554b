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

import importlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config
from .brats_cases import (
    GRADES,
    SPLITS_FILE,
    BratsDataError,
    CaseRecord,
    _check_modalities,
    centre_of,
    load_case,
    scan_cases,
    split_cases,
)
from .slices import SliceCache, extract_slices, normalise_volume, resize_slices

__all__ = [
    "GRADES",
    "SPLITS_FILE",
    "BratsDataError",
    "CaseRecord",
    "SiteDataset",
    "SliceCache",
    "centre_of",
    "extract_slices",
    "load_case",
    "normalise_volume",
    "resize_slices",
    "scan_cases",
    "site_datasets",
    "slice_settings",
    "source_dataset",
    "split_cases",
]


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
    sorted), ``centre``, ``split``, ``root``. ``background_slices_per_case`` adds that many tumour-free
    slices per case (:func:`~modalitybank.data.slices.extract_slices`). ``cases`` keeps only those case ids; ``suffixes`` maps
    modality names to other file-name suffixes (:func:`scan_cases`). Raises :class:`BratsDataError` if
    there is no slice.
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
        background_slices_per_case: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        n_test: int = 40,
        seed: int = 0,
        progress: bool = False,
        cases: Sequence[str] | None = None,
        suffixes: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if centre is not None and centre not in config.CENTRES:
            raise ValueError(f"unknown centre {centre!r}; choose one of {list(config.CENTRES)} or None")
        self.root = Path(root).expanduser().resolve()
        self.centre = centre
        self.split = split
        self.modalities: tuple[str, ...] = _check_modalities(modalities)
        self.image_size = int(image_size)
        all_records = scan_cases(self.root, grades, suffixes)
        chosen = split_cases(all_records, self.root, split, n_test=n_test, seed=seed)
        self.records: list[CaseRecord] = [r for r in chosen if (centre is None or r.centre == centre)
                                          and (cases is None or r.case_id in cases)]
        self.case_ids: list[str] = [r.case_id for r in self.records]
        cache = SliceCache(cache_dir) if cache_dir is not None else None

        it: Iterable[CaseRecord] = self.records
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(self.records, desc=f"slices {centre or 'all'}/{split}", unit="case")
        parts: list[dict[str, np.ndarray]] = []
        for rec in it:
            if cache is not None:
                out = cache.get(rec, self.modalities, self.image_size, min_tumour_fraction, max_slices_per_case,
                                background_slices_per_case)
            else:
                images, seg, _ = load_case(rec, self.modalities)
                out = extract_slices(images, seg, self.modalities, self.image_size, min_tumour_fraction,
                                     max_slices_per_case, background_slices_per_case)
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


def slice_settings(scale: str, **overrides: Any) -> dict[str, Any]:
    """The preset's slice selection (``config.preset(scale)["slices"]``) as :class:`SiteDataset` keyword
    arguments: what every GAN trains on, in one process or inside a federated site (tumour slices plus
    ``background_slices_per_case`` tumour-free ones). ``overrides`` win, e.g.
    ``background_slices_per_case=0`` for held-out metrics on tumour slices only."""
    sl = config.preset(scale)["slices"]
    out: dict[str, Any] = {
        "image_size": sl["image_size"],
        "min_tumour_fraction": sl["min_tumour_fraction"],
        "max_slices_per_case": sl["max_slices_per_case"],
        "background_slices_per_case": sl.get("background_slices_per_case", 0),
    }
    out.update(overrides)
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
    args = slice_settings(scale, **kw)
    return {
        site: SiteDataset(root, centres.get(site, site), mods, split=split, cache_dir=cache_dir, **args)
        for site, mods in exp["sites"].items()
    }


def source_dataset(
    root: str | os.PathLike[str],
    scale: str,
    cache_dir: str | os.PathLike[str] | None = None,
    source: str = "lgg",
    **kw: Any,
) -> SiteDataset:
    """The pre-training source set ``source`` (``configs/experiments.json`` → ``pretrain_sources``),
    all its cases (split ``"all"``), sized by ``config.preset(scale)["slices"]``.

    ``"lgg"`` (default): ``config.experiment("pretrain")`` (grade LGG, modality t1c) under ``root``.
    ``"hgg"`` / ``"nonbrain"``: ``root`` is that source set's folder, or a phantom root whose
    ``sources/<name>`` holds it (:func:`modalitybank.data.sources.resolve_source_root`; nothing is
    built here). The dataset's ``modalities`` name the loader's slot (``t1c``); the pre-trained base's
    name for its images is the source's ``base_modality``.
    """
    # through importlib: the source builders (phantom, cardiac) are not traced into a job's custom/ code
    resolve_source_root = importlib.import_module("modalitybank.data.sources").resolve_source_root
    pre = config.experiment("pretrain") if source == "lgg" else config.pretrain_source(source)
    root = resolve_source_root(root, source)
    args = slice_settings(scale, **kw)
    args.setdefault("grades", (pre["grade"],))
    args.setdefault("split", "all")
    return SiteDataset(root, None, [pre["modality"]], cache_dir=cache_dir, **args)


def discover_site(root: str | os.PathLike[str], suffixes: dict[str, str] | None = None,
                  ) -> tuple[list[str], list[str], list[str], tuple[str, ...]]:
    """What a hospital's own folder holds: every case in it is the site's.

    A modality is the site's if its file is present in at least half of the cases; a case lacking
    one of the site's modalities is left out and reported, not fatal.

    Returns ``(modalities, case_ids, skipped, grades)``: the site's modalities (canonical order),
    the usable case ids, one line per case left out (naming the missing files) and the grade
    folders found (``HGG`` / ``LGG``). Raises :class:`BratsDataError` if the folder holds no case or
    no modality.
    """
    root = Path(root).expanduser().resolve()
    grades = tuple(g for g in ("HGG", "LGG") if (root / g).is_dir())
    if not grades:
        raise BratsDataError(f"{root}: no HGG/ or LGG/ folder (BraTS layout: <root>/HGG/<case>/<case>_<m>.nii.gz)")
    records = scan_cases(root, grades, suffixes)
    count = {m: sum(m in r.files for r in records) for m in config.MODALITIES}
    modalities = [m for m in config.MODALITIES if count[m] and 2 * count[m] >= len(records)]
    if not modalities:
        raise BratsDataError(f"{root}: no modality file in any of its {len(records)} cases")
    usable, skipped = [], []
    for r in records:
        missing = [m for m in modalities if m not in r.files]
        if missing:
            skipped.append(f"case {r.case_id} skipped: missing " + ", ".join(str(r.expected_file(m)) for m in missing))
        else:
            usable.append(r.case_id)
    return modalities, usable, skipped, grades
