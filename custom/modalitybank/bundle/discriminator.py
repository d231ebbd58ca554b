"""The site-discriminator bundle (``bundles/site_discriminator``): the discriminator as a one-input
network, and the discriminator, optimiser and loss weights exactly as a federated site builds them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalitybank.networks import MASK_CHANNELS


class JointInputDiscriminator(nn.Module):
    """A conditional discriminator ``D(mask, image)`` as a one-input network ``D([mask, image])``.

    MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``) feed one tensor; this splits
    its channels into the mask channels (the first ``mask_channels``) and the image.
    """

    def __init__(self, discriminator: nn.Module, mask_channels: int = MASK_CHANNELS) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.mask_channels = mask_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x[:, : self.mask_channels], x[:, self.mask_channels:])


def site_discriminator_from_bundle(bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None,
                                   config_file: str = "train.json") -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A site's discriminator, its optimiser and the GAN loss weights, from the site-discriminator bundle.

    Args:
        bundle_dir: the bundle folder (``bundles/site_discriminator``).
        overrides: config ids to override, e.g. ``{"scale": "small"}`` or ``{"optimizer#lr": 1e-4}``.
        config_file: the config in ``configs/`` to read.

    Returns ``(discriminator, optimizer, gan_loss)``: a fresh
    :class:`~modalitybank.networks.ConditionalDiscriminator` (``D(mask, image)``), an optimiser over
    its parameters and a :class:`~modalitybank.gan.GanLoss` — what :func:`modalitybank.gan.site_step` takes.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / config_file))
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    parser.parse(reset=True)
    return (parser.get_parsed_content("discriminator"), parser.get_parsed_content("optimizer"),
            parser.get_parsed_content("gan_loss"))


def modality_dataset(dataset_dir: str | Path, modality: str, scale: str = "tiny", split: str = "train",
                     cache_dir: str | Path | None = None) -> Any:
    """The training slices of one modality (tumour slices and the preset's tumour-free ones), every data
    centre, of a BraTS-layout folder, sized by preset ``scale`` (what one site holding ``modality`` trains
    its discriminator on): a
    :class:`~modalitybank.data.brats.SiteDataset` with items ``{"image": (1, S, S), "label": (S, S),
    "brain": (S, S)}``."""
    from modalitybank.data.brats import SiteDataset, slice_settings

    return SiteDataset(dataset_dir, None, [modality], split=split, cache_dir=cache_dir, **slice_settings(scale))


def save_state(network: nn.Module, path: str | Path) -> str:
    """Write ``network.state_dict()`` to ``path`` (atomically): a bundle's ``models/model.pt``."""
    from modalitybank.bank import atomic_save

    return str(atomic_save(network.state_dict(), path))


def realism_items(dataset_dir: str | Path, modality: str, split: str = "test",
                  grades: tuple[str, ...] | list[str] = ("HGG",)) -> list[dict[str, str]]:
    """``[{"label": seg, "image": <modality> image, "case": id}]`` for the cases of a BraTS-layout folder
    (real ones, or the synthetic cases ``modalitybank synthesize`` / the generator bundle write).
    Override the inference config's ``data`` key to score other pairs."""
    from modalitybank import config
    from modalitybank.data.brats import BratsDataError, scan_cases, split_cases

    items = []
    for record in split_cases(scan_cases(dataset_dir, grades), Path(dataset_dir), split):
        if modality not in record.files:
            raise BratsDataError(f"case {record.case_id}: missing file {record.expected_file(modality)} "
                                 f"(modality {modality}, suffix {config.MODALITY_SUFFIX[modality]})")
        items.append({"label": str(record.files["seg"]), "image": str(record.files[modality]),
                      "case": record.case_id})
    return items


@torch.no_grad()
def realism_volume(network: nn.Module, seg: Any, image: Any, image_size: int, criterion: str = "least_squares",
                   min_tumour_fraction: float = 0.01, batch_size: int = 32) -> tuple[Any, dict[str, Any]]:
    """Score every axial slice of an (label map, image) pair with a one-input discriminator.

    Slices are prepared as for training (``modalitybank.data.slices``): the image normalised per volume
    inside its brain (image > 0) to [-1, 1], label map and brain resized (nearest) and the image
    resized (area) to ``image_size``; the discriminator's patch outputs are turned into a realism in
    [0, 1] as its training criterion reads them, resized back to the slice and set to 0 outside the brain.

    Args:
        network: ``D(cat(mask channels, image))``: ``(N, 6, S, S)`` → patch logits ``(N, 1, S', S')``
            (:class:`JointInputDiscriminator`).
        seg: ``(H, W, D)`` BraTS labels {0, 1, 2, 4}; image: ``(H, W, D)`` one modality.
        image_size: the discriminator's slice size ``S``.
        criterion: the GAN criterion it was trained with (``GanLoss.criterion``): ``"least_squares"``
            regresses real patches to 1 and synthetic ones to 0, so realism is the output clipped to
            [0, 1]; ``"bce"`` / ``"hinge"``: the sigmoid of the logits.
        min_tumour_fraction: a slice counts as a tumour slice (those the discriminator was trained on)
            when its tumour covers at least this fraction of its brain.

    Returns:
        ``(realism, summary)``: ``realism`` ``(H, W, D)`` float32 in [0, 1] (1: judged real), and
        ``{"score": mean realism over the brain of the tumour slices, "score_all_slices": over every
        brain slice, "tumour_slices": count, "brain_slices": count, "slice_scores": {axial index: mean}}``.
    """
    import numpy as np
    import torch.nn.functional as F

    from modalitybank.data.slices import normalise_volume, resize_slices
    from modalitybank.networks import mask_channels

    seg, image = np.asarray(seg), np.asarray(image, dtype=np.float32)
    brain = image > 0
    h, w, _ = seg.shape
    norm = normalise_volume(image, brain)
    realism = np.zeros(seg.shape, dtype=np.float32)
    slices = np.flatnonzero(brain.any(axis=(0, 1)))
    device = next(network.parameters()).device
    network.eval()
    for start in range(0, len(slices), batch_size):
        idx = slices[start:start + batch_size]
        lab = resize_slices(np.moveaxis(seg[:, :, idx], -1, 0)[:, None].astype(np.float32), image_size, nearest=True)
        brn = resize_slices(np.moveaxis(brain[:, :, idx], -1, 0)[:, None].astype(np.float32), image_size, nearest=True)
        img = np.clip(resize_slices(np.moveaxis(norm[:, :, idx], -1, 0)[:, None], image_size, nearest=False), -1, 1)
        mask = mask_channels(torch.from_numpy(lab[:, 0]).round().long(), torch.from_numpy(brn[:, 0] > 0.5))
        x = torch.cat([mask, torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))], dim=1).to(device)
        out = network(x).float()
        prob = out.clamp(0, 1) if criterion == "least_squares" else torch.sigmoid(out)
        prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False).cpu().numpy()[:, 0]
        realism[:, :, idx] = np.moveaxis(prob, 0, -1) * brain[:, :, idx]
    tumour_area, brain_area = (seg > 0).sum(axis=(0, 1)), brain.sum(axis=(0, 1))
    tumour = np.flatnonzero((tumour_area > 0) & (brain_area > 0) & (tumour_area >= min_tumour_fraction * brain_area))
    per_slice = {int(k): float(realism[:, :, k][brain[:, :, k]].mean()) for k in slices}
    summary = {
        "score": float(realism[:, :, tumour][brain[:, :, tumour]].mean()) if len(tumour) else float("nan"),
        "score_all_slices": float(realism[brain].mean()) if brain.any() else float("nan"),
        "tumour_slices": int(len(tumour)), "brain_slices": int(len(slices)), "slice_scores": per_slice,
    }
    return realism, summary


def score_items(network: nn.Module, items: Any, output_dir: str | Path, image_size: int,
                criterion: str = "least_squares", min_tumour_fraction: float = 0.01) -> dict[str, Any]:
    """Realism maps of (label map, image) pairs: the site discriminator bundle's inference.

    Args:
        network: the one-input discriminator (:class:`JointInputDiscriminator`) with trained weights.
        items: ``[{"label": NIfTI label map, "image": NIfTI image of the same grid, "case": optional name}]``.
        output_dir: writes ``<case>/<case>_realism.nii.gz`` (:func:`realism_volume`'s map, the label
            map's affine), ``<case>/<case>_realism.json`` (its summary) and ``realism.json`` (every case's
            score).
        image_size: the discriminator's slice size.
        criterion, min_tumour_fraction: as for :func:`realism_volume`.

    Returns ``{"cases": {case: {"score", "score_all_slices", "map", "json"}}, "mean_score": ..}``.
    """
    import json

    import nibabel as nib
    import numpy as np

    from modalitybank.bundle.generator import _case_name
    from modalitybank.data.brats_cases import BratsDataError, check_labels

    output_dir = Path(output_dir)
    cases: dict[str, Any] = {}
    for item in items:
        label_path, image_path = Path(item["label"]), Path(item["image"])
        label_img = nib.load(str(label_path))
        seg = np.asarray(label_img.dataobj)
        image = np.asarray(nib.load(str(image_path)).dataobj)
        if seg.ndim != 3 or image.shape != seg.shape:
            raise BratsDataError(f"{image_path}: shape {image.shape} differs from the 3D label map {label_path} {seg.shape}")
        check_labels(seg, label_path)
        case = str(item.get("case") or _case_name(label_path))
        realism, summary = realism_volume(network, seg, image, int(image_size), criterion, min_tumour_fraction)
        case_dir = output_dir / case
        case_dir.mkdir(parents=True, exist_ok=True)
        map_path, json_path = case_dir / f"{case}_realism.nii.gz", case_dir / f"{case}_realism.json"
        nib.save(nib.Nifti1Image(realism, label_img.affine), str(map_path))
        json_path.write_text(json.dumps({"case": case, "label": str(label_path), "image": str(image_path), **summary},
                                        indent=2))
        cases[case] = {"score": summary["score"], "score_all_slices": summary["score_all_slices"],
                       "map": str(map_path), "json": str(json_path)}
    scores = [c["score"] for c in cases.values() if np.isfinite(c["score"])]
    result = {"cases": cases, "mean_score": float(np.mean(scores)) if scores else float("nan")}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "realism.json").write_text(json.dumps(result, indent=2))
    return result
