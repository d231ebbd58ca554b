"""What the segmentation bundle adds to MONAI: the missing-modality channel and HD95 in millimetres.

* :class:`FillMissingModalitiesd` — a site (or a data set) that lacks a modality still feeds the
  network every input channel. Its datalist entry names the missing channels (``"missing":
  [index, ...]``, written by :func:`modalitybank.bundle.segmentation.brats_datalist`); the channel is
  loaded from a placeholder file and set to 0 *after* z-score normalisation, i.e. to the mean
  brain intensity of a present channel: the network sees "no information" there. Every row of the
  benchmark that lacks a modality (Real-X(n/a), a FedAvg site without it) is filled by this one
  transform.
* :class:`SpacedHausdorffDistance` — MONAI's ``HausdorffDistance`` handler calls its metric
  without the image spacing, so HD95 comes out in voxels. This one passes each case's voxel
  spacing (from the label's affine), so HD95 is in millimetres whatever the data's resolution.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers import HausdorffDistance
from monai.transforms import MapTransform

__all__ = ["MISSING_KEY", "FillMissingModalitiesd", "SpacedHausdorffDistance", "voxel_spacing"]

#: The datalist key listing the channels a case lacks (indices into its ``image`` list).
MISSING_KEY = "missing"


class FillMissingModalitiesd(MapTransform):
    """Set the channels listed under ``missing_key`` to ``fill`` and drop the key.

    Args:
        keys: the image key(s), channel-first ``(C, H, W[, D])``.
        missing_key: the data key holding the missing channel indices (absent or empty: nothing
            to fill).
        fill: the value of a missing channel (0: the normalised mean).

    Example::

        >>> t = FillMissingModalitiesd("image")
        >>> out = t({"image": torch.ones(3, 4, 4), "missing": [1]})
        >>> out["image"][:, 0, 0].tolist(), "missing" in out
        ([1.0, 0.0, 1.0], False)
    """

    def __init__(self, keys: KeysCollection, missing_key: str = MISSING_KEY, fill: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.missing_key = missing_key
        self.fill = float(fill)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        missing = [int(i) for i in d.pop(self.missing_key, None) or []]
        if not missing:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            bad = [i for i in missing if not 0 <= i < image.shape[0]]
            if bad:
                raise ValueError(f"{self.missing_key}={missing}: no channel {bad} in {key!r} of {image.shape[0]} channels")
            image = image.clone()
            image[missing] = self.fill
            d[key] = image
        return d


def voxel_spacing(image: torch.Tensor, spatial_dims: int) -> list[float]:
    """Voxel spacing (mm) of a channel-first MetaTensor, from its affine; 1.0 per axis for a plain tensor."""
    if isinstance(image, MetaTensor):
        return [float(s) for s in image.pixdim[:spatial_dims]]
    return [1.0] * spatial_dims


class SpacedHausdorffDistance(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler, in millimetres: each case's spacing comes from the
    affine of its label (``y``), so HD95 is comparable across data sets of any resolution.

    ``output`` is ``[y_pred, y]`` as lists of channel-first one-hot tensors (one per case, what
    ``from_engine(["pred", "label"])`` returns after decollation) or as batched tensors.
    """

    def update(self, output: Sequence[Any]) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        for pred, label in zip(y_pred, y, strict=True):
            spacing = voxel_spacing(label, label.ndim - 1)
            self.metric_fn(pred[None], label[None], spacing=spacing)
