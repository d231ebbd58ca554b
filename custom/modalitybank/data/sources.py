"""Pre-training source sets of the Table III ablation, made on demand.

Three sources (``configs/experiments.json`` → ``pretrain_sources``):

* ``lgg`` — the phantom's own ``LGG/`` folder (T1c); nothing to make (the default, as before);
* ``hgg`` — HGG-like T1c cases, disjoint from the phantom's training and test cases (own seed
  group, own ids ``PublicHGG_<k>``), :func:`modalitybank.data.phantom.hgg_source_plan`;
* ``nonbrain`` — the cardiac cine stand-in of :mod:`modalitybank.data.cardiac`.

Each of ``hgg`` / ``nonbrain`` lives in a root of its own, in the loaders' BraTS layout::

    <out>/HGG/<PublicHGG_k>/<id>_{t1ce,seg}.nii.gz      kind "hgg"
    <out>/CINE/<CineSAX_k>/<id>_{t1ce,seg}.nii.gz       kind "nonbrain" (cine image in the t1c slot)
    <out>/dataset.json                                 {"name": SOURCE_NAME, "source": kind, ...}

No ``splits.json``: the whole set is the source. Inside a phantom root the default place is
``<phantom>/sources/<kind>``: the phantom's loaders read only ``HGG/`` and ``LGG/`` and its
``splits.json``, so such a set never reaches the HGG train/test sets.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import preset, pretrain_source
from .brats_cases import BratsDataError

__all__ = ["KINDS", "SOURCES_DIR", "SOURCE_NAME", "make_source", "resolve_source_root", "source_info"]

#: ``name`` in a source set's dataset.json.
SOURCE_NAME = "ModalityBank pre-training source set"
#: The source sets :func:`make_source` writes.
KINDS: tuple[str, ...] = ("hgg", "nonbrain")
#: Folder of a phantom root where :func:`resolve_source_root` keeps its source sets.
SOURCES_DIR = "sources"
#: ``presets.json`` → ``data.cases`` key of each kind's case count.
COUNT_KEYS: dict[str, str] = {"hgg": "HGG_source", "nonbrain": "cardiac"}


def _plan(kind: str, seed: int, n: int) -> tuple[list[dict[str, Any]], Callable[[Path, dict[str, Any], float], list[str]],
                                                   Callable[[dict[str, Any]], list[str]]]:
    if kind == "hgg":
        from .phantom import _case_files, hgg_source_plan, write_hgg_source_case

        return hgg_source_plan(seed, n), write_hgg_source_case, _case_files
    if kind == "nonbrain":
        from .cardiac import cardiac_plan, case_files, write_cardiac_case

        return cardiac_plan(seed, n), write_cardiac_case, case_files
    raise ValueError(f"unknown source kind {kind!r}; choose one of {list(KINDS)}")


def source_info(root: str | Path) -> dict[str, Any] | None:
    """``root/dataset.json`` when ``root`` holds a source set, else ``None``."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info if info.get("name") == SOURCE_NAME else None


def make_source(out: str | Path, kind: str, scale: str = "tiny", seed: int = 0, progress: bool = True,
                count: int | None = None) -> dict[str, Any]:
    """Write the source set ``kind`` (``"hgg"`` or ``"nonbrain"``) to ``out``; return its summary
    (also ``out/dataset.json``).

    Sized by ``presets.json`` → ``data``: case count ``cases.HGG_source`` / ``cases.cardiac``
    (``count`` overrides it) and ``spacing_mm`` (the phantom's voxel size for ``hgg``; the in-plane
    pixel size for ``nonbrain``). Same ``seed`` → bit-identical arrays. A rerun with the same
    figures skips the cases already written; with other figures it rewrites the set. Raises
    ``FileExistsError`` if ``out`` holds something else than a source set of this kind.
    """
    out = Path(out)
    pre = pretrain_source(kind)
    data = preset(scale)["data"]
    spacing = float(data["spacing_mm"])
    n = int(data["cases"][COUNT_KEYS[kind]] if count is None else count)
    plan, write, files_of = _plan(kind, seed, n)
    folder = pre["grade"]
    summary: dict[str, Any] = {
        "name": SOURCE_NAME, "source": kind, "scale": scale, "seed": seed, "spacing_mm": spacing, "count": n,
        "grade": folder, "modality": pre["modality"], "base_modality": pre.get("base_modality", pre["modality"]),
        "description": pre.get("description", ""), "cases": [c["id"] for c in plan], "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    old_path = out / "dataset.json"
    resume = False
    if old_path.is_file():
        old = json.loads(old_path.read_text())
        if old.get("name") != SOURCE_NAME or old.get("source") != kind:
            raise FileExistsError(f"{old_path} exists and is not a {kind!r} source set; choose another folder")
        resume = all(old.get(k) == summary[k] for k in ("scale", "seed", "spacing_mm", "count"))
    elif any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no source set; choose another folder")
    keep = {c["id"] for c in plan}
    grade_dir = out / folder
    for d in sorted(grade_dir.glob("*")) if grade_dir.exists() else []:
        if d.name.startswith(".tmp_") or d.name not in keep or not resume:
            shutil.rmtree(d)
    from .phantom import _write_json

    _write_json(old_path, summary)
    for case in tqdm(plan, desc=f"source {kind} ({scale})", unit="case", disable=not progress):
        d = grade_dir / case["id"]
        if d.is_dir() and all((d / f).exists() for f in files_of(case)):
            continue
        write(out, case, spacing)
    summary["complete"] = True
    _write_json(old_path, summary)
    return summary


def resolve_source_root(data_root: str | Path, source: str = "lgg", scale: str | None = None, seed: int = 0,
                        build: bool = False, progress: bool = False) -> Path:
    """The folder the source set ``source`` is read from, given the ``data_root`` a user names.

    * ``"lgg"``: ``data_root`` itself (the phantom or real BraTS; its ``LGG/`` folder is read).
    * ``"hgg"`` / ``"nonbrain"``, and ``data_root`` is

      - a source set of that kind (:func:`make_source`'s output): that folder (completed first
        with ``build``, at the scale and seed it records);
      - a phantom root: ``data_root/sources/<kind>``, made with ``build`` at the phantom's scale
        and seed (so a phantom root serves all three sources);
      - missing or empty, and ``build``: made there at ``scale`` / ``seed``.

    Raises :class:`~modalitybank.data.brats_cases.BratsDataError` if the set is not there (and
    ``build`` is false) or ``data_root`` is something else.
    """
    pre = pretrain_source(source)  # validates the name
    root = Path(data_root).expanduser()
    if source == "lgg":
        return root
    info = source_info(root)
    hint = f"make it with `modalitybank data source --kind {source} --out DIR` (or pretrain builds it)"
    if info is not None:
        if info.get("source") != source:
            raise BratsDataError(f"{root}: holds the {info.get('source')!r} source set, not {source!r}")
        if not info.get("complete"):
            if not build:
                raise BratsDataError(f"{root}: the {source!r} source set is incomplete; {hint}")
            make_source(root, source, info["scale"], info["seed"], progress=progress, count=info["count"])
        return root
    phantom = root / "dataset.json"
    if phantom.is_file():
        from .phantom import NAME

        meta = json.loads(phantom.read_text())
        if meta.get("name") != NAME:
            raise BratsDataError(f"{root}: neither a phantom nor a {source!r} source set (dataset.json)")
        sub = root / SOURCES_DIR / source
        sub_info = source_info(sub)
        current = (sub_info is not None and sub_info.get("complete") and sub_info.get("scale") == meta["scale"]
                   and sub_info.get("seed") == meta["seed"])
        if not current:
            if not build:
                raise BratsDataError(f"{sub}: no {source!r} source set for this phantom; {hint}")
            make_source(sub, source, meta["scale"], meta["seed"], progress=progress)
        return sub
    if build and (not root.exists() or not any(root.iterdir())):
        if scale is None:
            raise ValueError("building a source set needs a scale")
        make_source(root, source, scale, seed, progress=progress)
        return root
    raise BratsDataError(f"{root}: no {source!r} source set ({pre.get('description', '')}); {hint}")
