"""The GAN step: the one piece of training logic every loop in the project runs.

One iteration of ModalityBank, split where the network splits it:

* **site** (:func:`site_step`, runs inside a hospital): update the discriminator on
  (mask, real) against (mask, fake); then compute the generator's loss for the fakes —
  adversarial + λ·L1 against the real image (+ optionally λ_fm·feature matching against the real
  image's discriminator features) — and return only its gradient with respect to the fakes, plus
  scalar losses.
* **server** (:func:`generator_step`): backpropagate the returned gradients through the
  generator into the parameters being learned (the bank entries), one optimiser step.

:func:`gan_step` chains the two in one process (AsynDGAN's reference setting: every site's
discriminator in one process). The federated executor calls :func:`site_step` on each site and
the controller :func:`generator_step` on the server, so all training shares this code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = ["GanLoss", "SiteBatch", "SiteModel", "gan_step", "generator_step", "region_balance_weights", "site_step"]


@dataclass(frozen=True)
class GanLoss:
    """Loss weights. Defaults are AsynDGAN's (pix2pix): least-squares GAN + 100·L1."""

    lambda_l1: float = 100.0
    criterion: str = "least_squares"
    #: 0 (the paper): every pixel weighs the same in the L1 term. 1: each region of the mask (outside the
    #: brain, healthy brain, necrosis, edema, enhancing) weighs the same in total, so a thin enhancing rim
    #: counts as much as the healthy brain; between: a mix. The weights come from the mask the server sent.
    l1_balance: float = 0.0
    #: 0 (the paper): no feature matching. > 0: pix2pixHD's feature-matching term, ``lambda_fm`` times the
    #: mean over the discriminator's intermediate layers of ``L1(D_k(mask, fake), D_k(mask, real))``: a pull
    #: towards the real image's local statistics (texture) rather than its pixels. Computed inside the site
    #: with its own discriminator; like the L1 term it is a target made from the real image.
    lambda_fm: float = 0.0

    @property
    def needs_features(self) -> bool:
        return self.lambda_fm > 0

    def adversarial_only(self) -> GanLoss:
        """These weights without the terms that pull towards the real image (L1, feature matching): what a
        site in privacy mode ``adversarial`` returns the gradient of."""
        return replace(self, lambda_l1=0.0, lambda_fm=0.0)

    def adversarial(self) -> PatchAdversarialLoss:
        return PatchAdversarialLoss(criterion=self.criterion)

    def l1(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The L1 term: ``mean(w · |fake − real|)``, ``w = 1`` unless :attr:`l1_balance` (mean ``w`` = 1)."""
        if self.l1_balance == 0:
            return F.l1_loss(fake, real)
        return (region_balance_weights(mask, self.l1_balance) * (fake - real).abs()).mean()

    @staticmethod
    def feature_matching(fake_features: Sequence[torch.Tensor], real_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over the intermediate layers (all but the logits) of ``L1(fake feature, real feature)``."""
        pairs = list(zip(fake_features[:-1], real_features[:-1], strict=True))
        return torch.stack([F.l1_loss(f, r.detach()) for f, r in pairs]).mean()


def region_balance_weights(mask: torch.Tensor, balance: float) -> torch.Tensor:
    """Per-pixel weights ``(N, 1, *S)`` of mean 1 from mask channels ``(N, 5, *S)``: ``1 − balance`` plus
    ``balance`` times weights that give every region present in the batch the same total."""
    regions = torch.cat([1 - mask[:, -1:], mask[:, :-1]], dim=1)  # outside the brain, then labels 0, 1, 2, 4
    dims = [0, *range(2, mask.dim())]
    area = regions.sum(dim=dims, keepdim=True)
    present = int((area > 0).sum())
    equal = (regions / area.clamp_min(1)).sum(dim=1, keepdim=True) * (regions[:, :1].numel() / present)
    return (1 - balance) + balance * equal


@dataclass
class SiteModel:
    """A site's discriminators (one per modality it holds) and their optimisers."""

    discriminators: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    @property
    def modalities(self) -> list[str]:
        return list(self.discriminators)


@dataclass
class SiteBatch:
    """One batch of a site: mask channels ``(N, 5, *S)`` and real images ``{modality: (N, 1, *S)}``;
    optionally the label map and brain mask ``(N, *S)`` the mask channels were made from."""

    mask: torch.Tensor
    reals: dict[str, torch.Tensor] = field(default_factory=dict)
    label: torch.Tensor | None = None
    brain: torch.Tensor | None = None


def site_step(discriminator: nn.Module, optimizer: torch.optim.Optimizer, mask: torch.Tensor, real: torch.Tensor,
              fake: torch.Tensor, loss: GanLoss = GanLoss(),
              returned: GanLoss | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """What a site does with one modality's fakes.

    Args:
        discriminator: ``D(mask, image) -> patch logits``; updated in place. With feature matching
            (``lambda_fm`` > 0) also ``D.features(mask, image) -> [layer outputs..., logits]``.
        optimizer: the discriminator's optimiser.
        mask: ``(N, 5, *S)`` mask channels the fakes were made from.
        real: ``(N, 1, *S)`` the site's real images of that modality (never leave the site).
        fake: ``(N, 1, *S)`` synthetic images from the server (any autograd history is cut).
        loss: loss weights (the discriminator's update and the reported losses).
        returned: loss weights of the gradient returned, if other than ``loss``: a site in privacy mode
            ``adversarial`` returns :meth:`GanLoss.adversarial_only`'s (no L1 or feature-matching
            term) while its discriminator update stays the same.

    Returns:
        ``grad``: ``dL_G/d fake`` of ``returned`` (or ``loss``), same shape as ``fake``, what the site
        returns to the server; ``losses``: ``{"d": .., "g_adv": .., "g_l1": .., "g_fm": .., "g": ..}`` as
        floats (``g`` of ``loss``; ``g_fm`` 0 without feature matching).
    """
    adversarial = loss.adversarial()
    fake = fake.detach().to(real.dtype)
    discriminator.train()
    optimizer.zero_grad(set_to_none=True)
    loss_d = 0.5 * (adversarial(discriminator(mask, real), target_is_real=True, for_discriminator=True)
                    + adversarial(discriminator(mask, fake), target_is_real=False, for_discriminator=True))
    loss_d.backward()
    optimizer.step()

    returned = loss if returned is None else returned
    fake_leaf = fake.clone().requires_grad_(True)
    if loss.needs_features or returned.needs_features:
        fake_features = discriminator.features(mask, fake_leaf)
        with torch.no_grad():
            real_features = discriminator.features(mask, real)
        logits, loss_fm = fake_features[-1], loss.feature_matching(fake_features, real_features)
    else:
        logits, loss_fm = discriminator(mask, fake_leaf), fake_leaf.new_zeros(())
    loss_adv = adversarial(logits, target_is_real=True, for_discriminator=False)
    loss_l1 = loss.l1(fake_leaf, real, mask)
    sent = loss_adv + returned.lambda_l1 * loss_l1 + returned.lambda_fm * loss_fm
    (grad,) = torch.autograd.grad(sent, fake_leaf)  # the discriminator's parameters get no gradient
    loss_g = loss_adv + loss.lambda_l1 * loss_l1 + loss.lambda_fm * loss_fm
    losses = {"d": loss_d.item(), "g_adv": loss_adv.item(), "g_l1": loss_l1.item(), "g_fm": loss_fm.item(),
              "g": loss_g.item()}
    return grad, losses


def generator_step(optimizer: torch.optim.Optimizer, fakes: Sequence[torch.Tensor],
                   grads: Sequence[torch.Tensor]) -> None:
    """Backpropagate the sites' gradients w.r.t. the fakes into the generator; one optimiser step.

    The gradients of all sites and modalities add up: the generator minimises the sum of the
    sites' losses, as in AsynDGAN.
    """
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(list(fakes), [g.to(f.dtype) for f, g in zip(fakes, grads, strict=True)])
    optimizer.step()


def gan_step(generator: nn.Module, g_optimizer: torch.optim.Optimizer, sites: Mapping[str, SiteModel],
             batches: Mapping[str, SiteBatch], loss: GanLoss = GanLoss()) -> dict[str, dict[str, float]]:
    """One iteration in a single process: every site's D step on fakes of each modality it holds,
    then one generator step on the sum of their gradients.

    Args:
        generator: a generator with ``generate_for_sites(masks, modalities) -> {site: {modality: fake}}``
            (one pass per modality over all sites' masks).
        g_optimizer: optimiser over what the generator learns (bank entries, or all weights in
            pre-training).
        sites: ``{site: SiteModel}``.
        batches: ``{site: SiteBatch}`` for this iteration.
        loss: loss weights.

    Returns:
        ``{"<site>/<modality>": losses}`` as returned by :func:`site_step`.
    """
    generator.train()
    fakes, grads, report = [], [], {}
    all_fakes = generator.generate_for_sites({name: batches[name].mask for name in sites},
                                             {name: site.modalities for name, site in sites.items()})
    for name, site in sites.items():
        batch = batches[name]
        for modality, fake in all_fakes[name].items():
            grad, losses = site_step(site.discriminators[modality], site.optimizers[modality], batch.mask,
                                     batch.reals[modality], fake, loss)
            fakes.append(fake)
            grads.append(grad)
            report[f"{name}/{modality}"] = losses
    generator_step(g_optimizer, fakes, grads)
    return report
