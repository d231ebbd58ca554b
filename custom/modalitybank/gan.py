"""The GAN step: the one piece of training logic every loop in the project runs.

One iteration of ModalityBank, split where the network splits it:

* **site** (:func:`site_step`, runs inside a hospital): update the discriminator on
  (mask, real) against (mask, fake); then compute the generator's loss for the fakes —
  adversarial + λ·L1 against the real image — and return only its gradient with respect to
  the fakes, plus scalar losses.
* **server** (:func:`generator_step`): backpropagate the returned gradients through the
  generator into the parameters being learned (the bank entries), one optimiser step.

:func:`gan_step` chains the two in one process (AsynDGAN's reference setting: every site's
discriminator in one process). The federated executor calls :func:`site_step` on each site and
the controller :func:`generator_step` on the server, so all training shares this code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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

    def adversarial(self) -> PatchAdversarialLoss:
        return PatchAdversarialLoss(criterion=self.criterion)

    def l1(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The L1 term: ``mean(w · |fake − real|)``, ``w = 1`` unless :attr:`l1_balance` (mean ``w`` = 1)."""
        if self.l1_balance == 0:
            return F.l1_loss(fake, real)
        return (region_balance_weights(mask, self.l1_balance) * (fake - real).abs()).mean()


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
        discriminator: ``D(mask, image) -> patch logits``; updated in place.
        optimizer: the discriminator's optimiser.
        mask: ``(N, 5, *S)`` mask channels the fakes were made from.
        real: ``(N, 1, *S)`` the site's real images of that modality (never leave the site).
        fake: ``(N, 1, *S)`` synthetic images from the server (any autograd history is cut).
        loss: loss weights (the discriminator's update and the reported losses).
        returned: loss weights of the gradient returned, if other than ``loss``: a site in privacy mode
            ``adversarial`` returns ``GanLoss(lambda_l1=0)``'s (no L1 term) while its discriminator
            update stays the same.

    Returns:
        ``grad``: ``dL_G/d fake`` of ``returned`` (or ``loss``), same shape as ``fake``, what the site
        returns to the server; ``losses``: ``{"d": .., "g_adv": .., "g_l1": .., "g": ..}`` as floats
        (``g`` of ``loss``).
    """
    adversarial = loss.adversarial()
    fake = fake.detach().to(real.dtype)
    discriminator.train()
    optimizer.zero_grad(set_to_none=True)
    loss_d = 0.5 * (adversarial(discriminator(mask, real), target_is_real=True, for_discriminator=True)
                    + adversarial(discriminator(mask, fake), target_is_real=False, for_discriminator=True))
    loss_d.backward()
    optimizer.step()

    fake_leaf = fake.clone().requires_grad_(True)
    loss_adv = adversarial(discriminator(mask, fake_leaf), target_is_real=True, for_discriminator=False)
    loss_l1 = loss.l1(fake_leaf, real, mask)
    loss_g = loss_adv + loss.lambda_l1 * loss_l1
    sent = loss_g if returned is None else loss_adv + returned.lambda_l1 * loss_l1
    (grad,) = torch.autograd.grad(sent, fake_leaf)  # the discriminator's parameters get no gradient
    losses = {"d": loss_d.item(), "g_adv": loss_adv.item(), "g_l1": loss_l1.item(), "g": loss_g.item()}
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
