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
