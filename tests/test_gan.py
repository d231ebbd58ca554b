"""The GAN step: the site/server split is exact, and only what should learn does."""

from __future__ import annotations

import torch

from modalitybank.gan import (
    GanLoss,
    SiteBatch,
    SiteModel,
    gan_step,
    generator_step,
    region_balance_weights,
    site_step,
)
from modalitybank.networks import ConditionalDiscriminator, ResnetGenerator, mask_channels


def _batch(n: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (n, size, size), generator=g)]
    brain = torch.ones(n, size, size, dtype=torch.uint8)
    real = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return mask_channels(label, brain), real


def _site(modalities: list[str]) -> SiteModel:
    ds = {m: ConditionalDiscriminator(channels=8, num_layers=2) for m in modalities}
    return SiteModel(ds, {m: torch.optim.Adam(d.parameters(), lr=1e-3) for m, d in ds.items()})


def test_site_gradient_equals_end_to_end_backprop() -> None:
    """What the server gets by backpropagating the site's dL/dfake is exactly the generator gradient
    of the site's loss computed end to end."""
    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=8, n_blocks=1)
    gen.bank.add("t2")
    gen.bank.freeze_base()
    mask, real = _batch()
    site = _site(["t2"])
    d = site.discriminators["t2"]
    fake = gen.generate(mask, ["t2"])["t2"]
    params = gen.bank.entry_parameters("t2")
    grad_fake, losses = site_step(d, site.optimizers["t2"], mask, real, fake, GanLoss())
    assert grad_fake.shape == fake.shape and torch.isfinite(grad_fake).all()
    split = torch.autograd.grad(fake, params, grad_fake, retain_graph=True)

    loss = GanLoss()
    fake2 = gen.generate(mask, ["t2"])["t2"]
    direct_loss = loss.adversarial()(d(mask, fake2), target_is_real=True, for_discriminator=False) \
        + loss.lambda_l1 * (fake2 - real).abs().mean()
    direct = torch.autograd.grad(direct_loss, params)
    for a, b in zip(split, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert set(losses) == {"d", "g_adv", "g_l1", "g_fm", "g"} and losses["g_fm"] == 0 and all(map(lambda v: v == v, losses.values()))


def _fm_step(loss: GanLoss, returned: GanLoss | None = None) -> tuple[torch.Tensor, dict[str, float],
                                                                   ConditionalDiscriminator, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """One site step of a fixed discriminator (lr 0, so its update leaves it as it was)."""
    torch.manual_seed(0)
    mask, real = _batch(n=3)
    d = ConditionalDiscriminator(channels=8, num_layers=2)
    fake = torch.tanh(real + 0.3 * torch.randn_like(real))
    grad, losses = site_step(d, torch.optim.SGD(d.parameters(), lr=0.0), mask, real, fake, loss, returned)
    return grad, losses, d, mask, real, fake


def test_feature_matching_adds_the_gradient_of_the_discriminators_layer_distances() -> None:
    """lambda_fm > 0 adds λ_fm · d/dfake of the mean over D's intermediate layers of L1(D_k(fake), D_k(real)),
    recomputed here from the layers of MONAI's PatchDiscriminator; lambda_fm 0 adds nothing."""
    base, losses0, *_ = _fm_step(GanLoss())
    grad, losses, d, mask, real, fake = _fm_step(GanLoss(lambda_fm=10.0))
    leaf = fake.clone().requires_grad_(True)
    layers_fake = d.net(torch.cat([mask, leaf], dim=1))[:-1]
    layers_real = d.net(torch.cat([mask, real], dim=1))[:-1]
    assert len(layers_fake) >= 2
    fm = sum((f - r.detach()).abs().mean() for f, r in zip(layers_fake, layers_real, strict=True)) / len(layers_fake)
    (expected,) = torch.autograd.grad(10.0 * fm, leaf)
    assert expected.abs().max() > 1e-3 * base.abs().max()  # the term is not negligible at this weight
    torch.testing.assert_close(grad - base, expected, rtol=1e-4, atol=1e-7)
    assert losses0["g_fm"] == 0 and abs(losses["g_fm"] - fm.item()) < 1e-5
    assert abs(losses["g"] - (losses["g_adv"] + 100 * losses["g_l1"] + 10 * losses["g_fm"])) < 1e-4


def test_adversarial_only_returns_neither_l1_nor_feature_matching() -> None:
    """A site in privacy mode adversarial returns the adversarial loss's gradient alone, whatever its
    training loss holds; the losses it reports still include the terms it trained with."""
    loss = GanLoss(lambda_l1=100.0, lambda_fm=10.0, l1_balance=0.5)
    assert loss.adversarial_only() == GanLoss(lambda_l1=0.0, lambda_fm=0.0, l1_balance=0.5)
    sent, losses, *_ = _fm_step(loss, loss.adversarial_only())
    adversarial, _, *_ = _fm_step(GanLoss(lambda_l1=0.0))
    torch.testing.assert_close(sent, adversarial)
    assert losses["g_fm"] > 0 and losses["g_l1"] > 0


def test_site_step_updates_discriminator() -> None:
    torch.manual_seed(0)
    mask, real = _batch()
    site = _site(["flair"])
    before = [p.detach().clone() for p in site.discriminators["flair"].parameters()]
    site_step(site.discriminators["flair"], site.optimizers["flair"], mask, real, torch.zeros_like(real))
    after = list(site.discriminators["flair"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_gan_step_learns_only_the_entries_the_sites_hold() -> None:
    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=8, n_blocks=1)
    for m in ("t1c", "t2", "flair"):
        gen.bank.add(m)
    gen.bank.freeze_base()
    base = gen.bank.base_state()
    state = {m: gen.bank.entry_state(m) for m in gen.bank.modalities}
    learned = [p for m in ("t1c", "t2", "flair") for p in gen.bank.entry_parameters(m)]
    opt = torch.optim.Adam(learned, lr=1e-2)
    sites = {"A": _site(["t1c"]), "B": _site(["t2"])}  # nobody holds FLAIR
    mask_a, real_a = _batch(seed=1)
    mask_b, real_b = _batch(seed=2)
    batches = {"A": SiteBatch(mask_a, {"t1c": real_a}), "B": SiteBatch(mask_b, {"t2": real_b})}
    report = gan_step(gen, opt, sites, batches)
    assert set(report) == {"A/t1c", "B/t2"}
    changed = {m: any(not torch.equal(v, gen.bank.entry_state(m)[k]) for k, v in state[m].items())
               for m in gen.bank.modalities}
    assert changed == {"t1c": True, "t2": True, "flair": False}
    assert all(torch.equal(v, gen.bank.base_state()[k]) for k, v in base.items())


def test_generator_step_sums_site_gradients() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    fakes = [w * 2, w * 3]
    generator_step(opt, fakes, [torch.ones(3), torch.ones(3)])
    torch.testing.assert_close(w.detach(), torch.full((3,), 1.0 - 5.0))


def test_asyndgan_generator_splits_channels() -> None:
    gen = ResnetGenerator(out_channels=3, ngf=8, n_blocks=1, modulated=False, output_modalities=["t1", "t2", "flair"])
    mask, _ = _batch()
    out = gen(mask)
    fakes = gen.generate(mask, ["flair", "t1"])
    torch.testing.assert_close(fakes["flair"], out[:, 2:3])
    torch.testing.assert_close(fakes["t1"], out[:, 0:1])


def test_region_balanced_l1_gives_every_region_of_the_mask_the_same_weight() -> None:
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 10:16, 10:16] = 2
    label[:, 12:14, 12:14] = 4  # a small enhancing core inside the edema, no necrosis
    brain = torch.zeros(2, 32, 32)
    brain[:, 4:28, 4:28] = 1
    mask = mask_channels(label, brain)
    regions = [brain == 0, (brain > 0) & (label == 0), label == 2, label == 4]
    w = region_balance_weights(mask, 1.0)[:, 0]
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    totals = torch.stack([w[r].sum() for r in regions])
    assert torch.allclose(totals, totals.mean().expand(4), rtol=1e-5)  # absent necrosis takes no share
    half = region_balance_weights(mask, 0.5)[:, 0]
    assert torch.allclose(half, 0.5 + 0.5 * w)
    # the L1 term: unchanged at 0 (the paper), and a residual on the small core counts more once balanced
    fake, real = torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    fake[:, 0][label == 4] = 1.0
    assert torch.isclose(GanLoss().l1(fake, real, mask), torch.nn.functional.l1_loss(fake, real))
    assert GanLoss(l1_balance=1.0).l1(fake, real, mask) > 10 * GanLoss().l1(fake, real, mask)
