"""The BraTS-like phantom: the default, embedded data set (real BraTS cannot be downloaded here).

Real MNI anatomy, deformed per case; synthetic HGG/LGG tumours with mass effect; T1, T1c, T2
and FLAIR contrasts; three HGG data centres with their own scanner styles (plus a "public"
style for the LGG pre-training set), written in the BraTS 2018 layout and naming:

    root/HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   train + held-out test cases
    root/LGG/<case>/<case>_{t1ce,seg}.nii.gz               pre-training source set (T1c only)
    root/splits.json, root/dataset.json

Two further source sets for the pre-training ablation (Table III) are made on demand, each in a
root of its own, never in ``root/HGG`` (so they cannot leak into the HGG train/test cases): the
HGG-like T1c source (:func:`hgg_source_plan`, group ``HGG_source``) here, and the cardiac cine
stand-in in :mod:`modalitybank.data.cardiac`; :func:`modalitybank.data.sources.make_source` makes either.

Every case is drawn from ``numpy.random.default_rng([seed, group, index])``: the same seed gives
the same arrays, and a rerun after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ..config import CENTRES, MODALITIES, MODALITY_SUFFIX, preset
from .anatomy import (
    Deformation,
    mass_effect,
    random_deformation,
    resample,
    template,
    tissue_labels,
    tissue_probabilities,
)
from .scanner import centre_style, jitter, make_bias_field, relative_image, scan
from .tumour import RADIUS_MM, make_tumour, pick_centre

NAME = "ModalityBank BraTS-like phantom"
#: Stable group numbers that seed each case: (seed, group, index within group).
#: Never renumber: existing data stays bit-identical only while each group keeps its number.
GROUPS: dict[str, int] = {"CBICA": 0, "TCIA": 1, "Other": 2, "test": 3, "LGG": 4, "HGG_source": 5, "cardiac": 6}
#: The groups :func:`make_phantom` writes (its ``cases`` keys); the others are separate source sets.
PHANTOM_GROUPS: tuple[str, ...] = ("CBICA", "TCIA", "Other", "test", "LGG")
#: Style of the LGG pre-training source set.
LGG_STYLE = "public"
#: BraTS 2018 numbers of the 2013 cases: HGG ones, then LGG ones (ours continue from 30).
_HGG_2013 = (2, 3, 4, 5, 7, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22, 23, 25, 26, 27)
_LGG_2013 = (0, 1, 6, 8, 9, 15, 16, 24, 28, 29)
_TCIA_HGG = (1, 2, 3, 4, 5, 6, 8)  # TCIA0<k> collections with HGG cases
_TCIA_LGG = (9, 10, 12, 13)  # TCIA<kk> collections with LGG cases


@dataclass
class PhantomCase:
    """One synthetic case, in memory."""

    images: dict[str, np.ndarray]  # modality -> int16 volume
    seg: np.ndarray  # uint8 BraTS labels
    tissue: np.ndarray  # uint8: 0 background, 1 CSF, 2 GM, 3 WM (before the tumour is laid)
    brain: np.ndarray  # bool brain mask (images are 0 outside it)
    affine: np.ndarray  # voxel -> world, mm, RAS
    style: dict[str, float]  # the scanner style used, with this case's jitter
    tumour_centre_mm: list[float]
    tumour_radius_mm: float


def _rng(seed: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def phantom_case(
    seed: np.random.Generator | int | Sequence[int],
    spacing_mm: float = 2.5,
    centre: str = "CBICA",
    kind: str = "HGG",
    modalities: Sequence[str] = MODALITIES,
) -> PhantomCase:
    """Synthesise one case: deform the anatomy, push it aside where the tumour grows, lay the
    tumour, render ``modalities`` with ``centre``'s scanner style. ``kind`` is "HGG" or "LGG"."""
    rng = _rng(seed)
    tmpl = template(float(spacing_mm))
    s = tmpl.spacing
    deform: Deformation = random_deformation(tmpl.shape, s, rng, amplitude_mm=2.5)
    coords = deform.coords()

    # choose the tumour site on the deformed anatomy (cerebral WM, judged in atlas coordinates)
    wm_brain = resample(tmpl.maps[[3, 4]], coords)
    mni = np.einsum("ij,j...->i...", tmpl.affine[:3, :3], coords) + tmpl.affine[:3, 3, None, None, None]
    radius = float(rng.uniform(*RADIUS_MM[kind]))
    core_guess = radius * (0.6 if kind == "HGG" else 0.65)
    centre_vox = pick_centre(wm_brain[0], wm_brain[1] > 0.5, mni, s, core_guess, rng)

    # mass effect, composed with the deformation so the anatomy is resampled only once
    push = rng.uniform(0.25, 0.5) if kind == "HGG" else rng.uniform(0.1, 0.3)
    coords = mass_effect(coords, deform, centre_vox, push, 0.8 * radius / s)
    t1, csf, gm, wm, brain_p = resample(tmpl.maps, coords)
    brain = brain_p > 0.5
    probs = tissue_probabilities(csf, gm, wm, brain)
    tissue = tissue_labels(probs, brain)

    tumour = make_tumour(kind, centre_vox, probs, brain, s, rng, radius_mm=radius)
    style = jitter(centre_style(centre), rng)
    bias = make_bias_field(brain.shape, style, s, rng)  # one coil, one session: shared
    images = {}
    for m in modalities:
        rel = relative_image(m, probs, t1, tmpl.t1_tissue_means, tumour.soft, tumour.texture, kind)
        images[m] = scan(rel, brain, style, s, rng, bias)
    centre_mm = (tmpl.affine[:3, :3] @ centre_vox + tmpl.affine[:3, 3]).tolist()
    return PhantomCase(
        images, tumour.seg, tissue, brain, tmpl.affine.copy(), style.as_dict(), centre_mm, radius
    )


# ----------------------------------------------------------------------------- case ids


def case_ids(seed: int, centre: str, n: int) -> list[str]:
    """``n`` unique BraTS 2018 style ids of ``centre`` (CBICA, TCIA, Other, or LGG). The first k
    ids do not depend on n, so adding test cases never renames training cases."""
    rng = np.random.default_rng([seed, 100 + GROUPS.get(centre, 9)])
    if centre == "CBICA":
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        codes = rng.permutation(26**3)[:n]
        return ["Brats18_CBICA_" + "".join(letters[c // 26**i % 26] for i in (2, 1, 0)) + "_1" for c in codes]
    if centre == "TCIA":
        codes = rng.permutation(len(_TCIA_HGG) * 1000)[:n]
        return [f"Brats18_TCIA0{_TCIA_HGG[c // 1000]}_{c % 1000:03d}_1" for c in codes]
    if centre == "Other":
        numbers = list(_HGG_2013) + list(range(30, 30 + max(0, n - len(_HGG_2013))))
        return [f"Brats18_2013_{k}_1" for k in numbers[:n]]
    if centre == "LGG":  # alternately BraTS 2013 LGG numbers and TCIA LGG collections
        codes = iter(rng.permutation(len(_TCIA_LGG) * 1000))
        old = iter(_LGG_2013)
        ids = []
        for i in range(n):
            k = next(old, None) if i % 2 == 0 else None
            if k is not None:
                ids.append(f"Brats18_2013_{k}_1")
            else:
                c = next(codes)
                ids.append(f"Brats18_TCIA{_TCIA_LGG[c // 1000]:02d}_{c % 1000:03d}_1")
        return ids
    raise ValueError(f"unknown centre {centre!r}")


def _plan(seed: int, counts: dict[str, int]) -> list[dict[str, Any]]:
    """Every case to make: id, folder, centre, tumour kind, RNG seed, split."""
    n_test = {c: len(range(i, counts["test"], len(CENTRES))) for i, c in enumerate(CENTRES)}
    ids = {c: case_ids(seed, c, counts[c] + n_test[c]) for c in CENTRES}
    plan = []
    for c in CENTRES:
        for i in range(counts[c]):
            plan.append(
                dict(
                    id=ids[c][i], folder="HGG", centre=c, kind="HGG", seed=[seed, GROUPS[c], i], split="train"
                )
            )
    for i in range(counts["test"]):
        c = CENTRES[i % len(CENTRES)]
        plan.append(
            dict(
                id=ids[c][counts[c] + i // len(CENTRES)],
                folder="HGG",
                centre=c,
                kind="HGG",
                seed=[seed, GROUPS["test"], i],
                split="test",
            )
        )
    for i, cid in enumerate(case_ids(seed, "LGG", counts["LGG"])):
        plan.append(
            dict(
                id=cid, folder="LGG", centre=LGG_STYLE, kind="LGG", seed=[seed, GROUPS["LGG"], i], split="lgg"
            )
        )
    return plan


# ----------------------------------------------------------------------------- writing


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _case_modalities(case: dict[str, Any]) -> tuple[str, ...]:
    if case.get("modalities"):
        return tuple(case["modalities"])
    return MODALITIES if case["folder"] == "HGG" else ("t1c",)


def _case_files(case: dict[str, Any]) -> list[str]:
    mods = _case_modalities(case)
    return [f"{case['id']}_{MODALITY_SUFFIX[m]}.nii.gz" for m in mods] + [f"{case['id']}_seg.nii.gz"]


def _write_case(root: Path, case: dict[str, Any], spacing: float) -> None:
    """Synthesise and write one case into a temporary folder, then rename it into place."""
    mods = _case_modalities(case)
    pc = phantom_case(case["seed"], spacing, case["centre"], case["kind"], mods)
    final = root / case["folder"] / case["id"]
    tmp = root / case["folder"] / f".tmp_{case['id']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for m in mods:
        _save_nifti(tmp / f"{case['id']}_{MODALITY_SUFFIX[m]}.nii.gz", pc.images[m], pc.affine)
    _save_nifti(tmp / f"{case['id']}_seg.nii.gz", pc.seg, pc.affine)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _summary(
    scale: str, seed: int, spacing: float, counts: dict[str, int], plan: list[dict[str, Any]]
) -> dict[str, Any]:
    tmpl = template(spacing)
    hgg = [p for p in plan if p["folder"] == "HGG"]
    return {
        "name": NAME,
        "scale": scale,
        "seed": seed,
        "spacing_mm": spacing,
        "shape": list(tmpl.shape),
        "affine": tmpl.affine.tolist(),
        "counts": counts,
        "cases": {c: [p["id"] for p in hgg if p["centre"] == c and p["split"] == "train"] for c in CENTRES},
        "test": [p["id"] for p in hgg if p["split"] == "test"],
        "centre_of": {p["id"]: p["centre"] for p in hgg},
        "lgg": [p["id"] for p in plan if p["folder"] == "LGG"],
        "styles": {c: centre_style(c).as_dict() for c in (*CENTRES, LGG_STYLE)},
        "modalities": {"HGG": list(MODALITIES), "LGG": ["t1c"]},
        "labels": {"1": "necrosis / non-enhancing core", "2": "edema", "4": "enhancing tumour"},
        "description": (
            "Synthetic BraTS 2018-like data: MNI152 2009 anatomy (nilearn) deformed per case, "
            "irregular HGG tumours (necrosis 1, edema 2, enhancing rim 4) with mass effect, "
            "T1/T1c/T2/FLAIR contrasts, one scanner style per data centre (intensity curve, bias "
            "field, Rician noise, blur) with per-case jitter. LGG: smaller tumours (non-enhancing "
            "core 1, edema 2), T1c only, 'public' style: the pre-training source set."
        ),
        "complete": False,
    }


def make_phantom(
    root: str | Path,
    scale: str = "tiny",
    seed: int = 0,
    progress: bool = True,
    cases: dict[str, int] | None = None,
) -> dict:
    """Write the phantom to `root` and return the summary dict also written to root/dataset.json.

    ``cases`` overrides the preset's case counts (keys CBICA, TCIA, Other, test, LGG). A rerun
    with the same scale, seed and counts skips the cases already written; with different ones
    it rewrites the phantom (only a folder holding this phantom is ever overwritten)."""
    root = Path(root)
    data = preset(scale)["data"]
    spacing = float(data["spacing_mm"])
    counts = {k: int(v) for k, v in data["cases"].items() if k in PHANTOM_GROUPS}
    if cases:
        unknown = set(cases) - set(PHANTOM_GROUPS)
        if unknown:
            raise ValueError(f"unknown case groups {sorted(unknown)}; use {sorted(PHANTOM_GROUPS)}")
        counts.update({k: int(v) for k, v in cases.items()})
    plan = _plan(seed, counts)
    summary = _summary(scale, seed, spacing, counts, plan)

    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "dataset.json"
    resume = False
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("name") != NAME:
            raise FileExistsError(f"{meta_path} exists and is not a {NAME}; choose another root")
        keys = ("scale", "seed", "spacing_mm", "counts")
        resume = all(old.get(k) == summary[k] for k in keys)
    elif any(any((root / f).iterdir()) for f in ("HGG", "LGG") if (root / f).is_dir()):
        raise FileExistsError(f"{root} holds HGG/LGG data but no phantom dataset.json; choose another root")
    keep = {(p["folder"], p["id"]) for p in plan}
    for folder in ("HGG", "LGG"):  # leftovers of an interrupted or different run
        for d in sorted((root / folder).glob("*")) if (root / folder).exists() else []:
            if d.name.startswith(".tmp_") or (folder, d.name) not in keep or not resume:
                shutil.rmtree(d)
    _write_json(meta_path, summary)

    for case in tqdm(plan, desc=f"phantom ({scale})", unit="case", disable=not progress):
        folder = root / case["folder"] / case["id"]
        if folder.is_dir() and all((folder / f).exists() for f in _case_files(case)):
            continue
        _write_case(root, case, spacing)

    _write_json(
        root / "splits.json",
        {"train": [p["id"] for p in plan if p["split"] == "train"], "test": summary["test"]},
    )
    summary["complete"] = True
    _write_json(meta_path, summary)
    return summary


# ----------------------------------------------------------------------------- HGG-like source set

#: Folder of the HGG-like T1c source set inside its own root (the BraTS grade folder name).
HGG_SOURCE_FOLDER = "HGG"


def hgg_source_plan(seed: int, n: int) -> list[dict[str, Any]]:
    """The ``n`` cases of the HGG-like T1c source set: seeded by group ``HGG_source`` (never a
    training or test group) and named ``PublicHGG_<k>``, an id no phantom case has."""
    return [
        dict(id=f"PublicHGG_{i:03d}", folder=HGG_SOURCE_FOLDER, centre=LGG_STYLE, kind="HGG",
             seed=[seed, GROUPS["HGG_source"], i], split="source", modalities=["t1c"])
        for i in range(int(n))
    ]


def write_hgg_source_case(root: Path, case: dict[str, Any], spacing: float) -> list[str]:
    """Write one case of :func:`hgg_source_plan` under ``root``; returns the file names it holds."""
    _write_case(root, case, spacing)
    return _case_files(case)
