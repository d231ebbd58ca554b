"""From masks to complete multi-modality cases, and the held-out image quality of a generator.

:func:`synthesize_cases` turns the segmentation of each case of a BraTS-layout folder into a
complete case: every requested modality generated slice by slice (or, with ``keep_real``, the
real one copied where the site holds it: modality completion), written as NIfTI in the BraTS
layout with the case's affine, plus a MONAI datalist JSON.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm.auto import tqdm

from modalitybank import config
from modalitybank.data.brats import (
    BratsDataError,
    SiteDataset,
    load_case,
    normalise_volume,
    resize_slices,
    scan_cases,
    split_cases,
)
from modalitybank.networks import ResnetGenerator, mask_channels

__all__ = ["evaluate_generator", "synthesize_cases", "synthesize_run", "synthesize_volume"]

#: Synthetic intensities are written as int16 in [0, INTENSITY_SCALE] (BraTS stores int16 too).
INTENSITY_SCALE = 1000


@torch.no_grad()
def synthesize_volume(generator: ResnetGenerator, seg: np.ndarray, brain: np.ndarray, modalities: Sequence[str],
                      image_size: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Generate ``modalities`` for a whole volume, one axial slice at a time.

    Args:
        seg: ``(H, W, D)`` BraTS labels; brain: ``(H, W, D)`` brain mask.
        image_size: the generator's slice size (slices are resized to it and back).

    Returns:
        ``{modality: (H, W, D) int16}`` in ``[0, INTENSITY_SCALE]``, 0 outside the brain.
    """
    generator.eval()
    h, w, d = seg.shape
    out = {m: np.zeros((h, w, d), dtype=np.int16) for m in modalities}
    slices = np.flatnonzero(brain.any(axis=(0, 1)))
    for start in range(0, len(slices), batch_size):
        idx = slices[start:start + batch_size]
        lab = resize_slices(np.moveaxis(seg[:, :, idx], -1, 0)[:, None].astype(np.float32), image_size, nearest=True)
        brn = resize_slices(np.moveaxis(brain[:, :, idx], -1, 0)[:, None].astype(np.float32), image_size, nearest=True)
        mask = mask_channels(torch.from_numpy(lab[:, 0]).round().long(), torch.from_numpy(brn[:, 0]))
        fakes = generator.generate(mask, modalities)
        for m, fake in fakes.items():
            img = resize_slices(fake.numpy(), (h, w), nearest=False)[:, 0]  # (n, H, W) in [-1, 1]
            img = np.clip((img + 1) / 2, 0, 1) * INTENSITY_SCALE
            img = np.moveaxis(img, 0, -1) * brain[:, :, idx]
            out[m][:, :, idx] = np.round(img).astype(np.int16)
    return out


def resample_volume(images: dict[str, np.ndarray], brain: np.ndarray, modalities: Sequence[str],
                    image_size: int) -> dict[str, np.ndarray]:
    """The real ``images`` as the GAN sees them: normalised as its training slices, each axial slice
    resized to ``image_size`` and back, written like a synthetic volume (int16 in ``[0, INTENSITY_SCALE]``).

    A segmentation network trained on these is the ceiling of one trained on synthetic images:
    what is lost here is lost to resolution and normalisation, not to the generator.
    """
    h, w, _ = brain.shape
    out = {}
    for m in modalities:
        norm = np.moveaxis(normalise_volume(images[m], brain), -1, 0)[:, None]  # (D, 1, H, W) in [-1, 1]
        back = resize_slices(resize_slices(norm, image_size, nearest=False), (h, w), nearest=False)[:, 0]
        img = np.clip((np.moveaxis(back, 0, -1) + 1) / 2, 0, 1) * INTENSITY_SCALE * brain
        out[m] = np.round(img).astype(np.int16)
    return out


def synthesize_cases(generator: ResnetGenerator | None, data_root: str | Path, out_dir: str | Path,
                     modalities: Sequence[str], image_size: int, split: str = "test", grades: Sequence[str] = ("HGG",),
                     keep_real: bool = False, real_modalities: dict[str, Sequence[str]] | None = None,
                     progress: bool = True, centres: Sequence[str] | None = None) -> dict[str, Any]:
    """Write complete cases for the masks of ``data_root`` into ``out_dir`` (BraTS layout + datalist).

    Args:
        generator: trained generator holding ``modalities``; ``None``: the real images at the
            generator's resolution instead (:func:`resample_volume`, the synthetic rows' ceiling).
        data_root: BraTS-layout folder; each case needs its seg and at least one image (for the
            brain mask).
        out_dir: output root: ``out_dir/<grade>/<case>/<case>_<suffix>.nii.gz`` and
            ``out_dir/datalist.json``.
        modalities: modalities of the output cases, in datalist channel order.
        image_size: the generator's slice size.
        split: ``train``, ``test`` or ``all`` of ``data_root``'s split.
        keep_real: copy a real modality where the case's site holds it; generate only the missing
            ones (modality completion). Without it every modality is synthetic.
        real_modalities: ``{centre: modalities it holds}`` (an experiment's sites); default: the
            files present on disk.
        centres: only the cases of these data centres (default: all).
    """
    out_dir = Path(out_dir)
    records = split_cases(scan_cases(data_root, grades), Path(data_root), split)
    if centres is not None:
        records = [r for r in records if r.centre in centres]
    entries = []
    for record in tqdm(records, desc="synthesize", unit="case", disable=not progress):
        present = [m for m in config.MODALITIES if m in record.files]
        if not present:
            raise BratsDataError(f"{record.folder}: case {record.case_id} has no image to take the brain mask from")
        held = present if real_modalities is None else [m for m in real_modalities.get(record.centre, []) if m in present]
        images, seg, affine = load_case(record, present)
        brain = np.any([images[m] > 0 for m in present], axis=0)
        real = [m for m in modalities if keep_real and m in held]
        fake = [m for m in modalities if m not in real]
        case_dir = out_dir / record.grade / record.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        if generator is None:
            generated = resample_volume(images, brain, fake, image_size)
        else:
            generated = synthesize_volume(generator, seg, brain, fake, image_size) if fake else {}
        paths = {}
        for m in modalities:
            paths[m] = case_dir / f"{record.case_id}_{config.MODALITY_SUFFIX[m]}.nii.gz"
            if m in real:
                shutil.copyfile(record.files[m], paths[m])
            else:
                nib.save(nib.Nifti1Image(generated[m], affine), paths[m])
        seg_path = case_dir / f"{record.case_id}_seg.nii.gz"
        nib.save(nib.Nifti1Image(seg, affine), seg_path)
        entries.append({"image": [str(paths[m].relative_to(out_dir)) for m in modalities],
                        "label": str(seg_path.relative_to(out_dir)), "case": record.case_id,
                        "centre": record.centre, "synthetic": fake})
    datalist = {"description": "ModalityBank synthetic cases", "modalities": list(modalities),
                "labels": {"0": "background", "1": "necrosis", "2": "edema", "4": "enhancing"},
                "training": entries}
    (out_dir / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return {"cases": len(entries), "out_dir": str(out_dir), "datalist": str(out_dir / "datalist.json"),
            "synthetic": sum(len(e["synthetic"]) for e in entries)}


def synthesize_run(run_dir: str | Path, data_root: str | Path, out_dir: str | Path,
                   modalities: Sequence[str] | None = None, experiment: str | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """:func:`synthesize_cases` with the generator saved in ``run_dir`` (a bank or an AsynDGAN run).

    ``modalities`` default to every modality the generator holds; ``experiment`` (with
    ``keep_real``) names which modalities each centre really holds; ``kwargs`` go to
    :func:`synthesize_cases`.
    """
    from modalitybank.store import load_generator, read_info

    info = read_info(run_dir)
    modalities = list(modalities or info["modalities"])
    generator = load_generator(run_dir, modalities if info["architecture"]["modulated"] else None)
    real = config.experiment(experiment)["sites"] if experiment else None
    return synthesize_cases(generator, data_root, out_dir, modalities, info["image_size"], real_modalities=real,
                            **kwargs)


@torch.no_grad()
def evaluate_generator(generator: ResnetGenerator, dataset: SiteDataset, modalities: Sequence[str] | None = None,
                       batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Held-out image quality per modality: mean L1, PSNR and SSIM (images in [-1, 1]) of the
    generator's output for the dataset's masks against the real slices."""
    generator.eval()
    modalities = list(dataset.modalities if modalities is None else modalities)
    psnr, ssim = PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=2, data_range=2.0)
    result = {}
    for m in modalities:
        channel = list(dataset.modalities).index(m)
        l1, n = 0.0, 0
        psnr.reset()
        ssim.reset()
        for start in range(0, len(dataset), batch_size):
            end = min(start + batch_size, len(dataset))
            mask = mask_channels(dataset.labels[start:end], dataset.brains[start:end])
            fake = generator.generate(mask, [m])[m]
            real = dataset.images[start:end, channel:channel + 1]
            l1 += float((fake - real).abs().mean(dim=(1, 2, 3)).sum())
            n += end - start
            psnr(fake, real)
            ssim(fake, real)
        result[m] = {"l1": round(l1 / n, 5), "psnr": round(float(psnr.aggregate()), 3),
                     "ssim": round(float(ssim.aggregate()), 4)}
    return result
