"""Privacy modes and differential privacy of what a site returns, without a federation running."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from modalitybank import dp
from modalitybank.fl import wire
from modalitybank.fl.executor import SiteExecutor
from modalitybank.fl.privacy import check_result, error_reply
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, site_step
from modalitybank.networks import build_discriminator, mask_channels

# TF Privacy's published MNIST DP-SGD table (tensorflow/privacy, tutorials/README.md: N = 60000, batch 256,
# δ = 1e-5; ε from `compute_dp_sgd_privacy.py`), and Abadi et al. 2016, Sec. 3.1 (q = 0.01, σ = 4,
# T = 10000, δ = 1e-5: ε ≈ 1.26 with the moments accountant). Both convert RDP to (ε, δ) with the
# classical bound (Mironov 2017, Prop. 3).
PUBLISHED = [  # (noise multiplier, sampling rate, steps, published ε)
    (1.1, 256 / 60000, math.ceil(60 * 60000 / 256), 3.01),
    (1.3, 256 / 60000, math.ceil(15 * 60000 / 256), 1.19),
    (0.7, 256 / 60000, math.ceil(45 * 60000 / 256), 7.10),
    (4.0, 0.01, 10000, 1.26),
]


@pytest.mark.parametrize("z,q,steps,published", PUBLISHED)
def test_epsilon_equals_published_values(z: float, q: float, steps: int, published: float) -> None:
    assert round(dp.epsilon(z, q, steps, 1e-5, conversion="classical"), 2) == published
    # what a site reports: the same RDP curve with the tighter conversion (Balle et al. 2020)
    assert dp.epsilon(z, q, steps, 1e-5) < published


def test_noise_from_budget_spends_it_in_the_planned_steps() -> None:
    settings = dp.resolve_privacy({"mode": "dp", "epsilon": 8, "delta": 1e-5, "clip": 0.1, "steps": 150},
                                  batch_size=8, modalities=2)
    assert settings.accounted_noise_multiplier == pytest.approx(settings.noise_multiplier / (2 * math.sqrt(16)))
    sanitizer = dp.SiteSanitizer(settings)
    assert sanitizer.epsilon(150) == pytest.approx(8, abs=1e-3) and sanitizer.epsilon(151) > 8


def test_signal_to_noise_ceiling_holds_for_the_sanitiser_and_does_not_grow_with_steps() -> None:
    # at fixed (ε, δ) the ceiling is the same for 150 or 1500 steps, 8 or 32 slices a batch
    ceiling = dp.snr_ceiling(8, 1e-5, 150)
    assert dp.snr_ceiling(8, 1e-5, 1500) == pytest.approx(ceiling, rel=1e-3)
    assert dp.snr_ceiling(1, 1e-5, 150) < 0.2 < ceiling < 1.0
    settings = dp.resolve_privacy({"mode": "dp", "epsilon": 8, "delta": 1e-5, "clip": 0.1, "steps": 20},
                                  batch_size=4, modalities=2)
    assert settings.snr_ceiling == pytest.approx(ceiling, rel=1e-3)
    assert dp.resolve_privacy("standard").snr_ceiling is None
    # the best case the ceiling bounds: every example's gradient is C along the same direction u; what the server
    # accumulates along u over the planned steps, through the site's own sanitiser, is signal ± noise
    rng = np.random.default_rng(0)
    u = rng.normal(size=(1, 64))
    u /= np.linalg.norm(u)
    grad = np.repeat(u * 10.0, 4, axis=0).astype(np.float32)  # norm 10, clipped to C = 0.1
    totals = []
    for trial in range(200):
        sanitizer = dp.SiteSanitizer(settings, rng=np.random.default_rng(trial))
        total = 0.0
        for _ in range(settings.steps):
            out = sanitizer.sanitize({"fake/t1": grad, "fake/t2": grad})
            total += sum(float((g.astype(np.float64) @ u[0]).sum()) for g in out.values())
        totals.append(total)
    signal = settings.steps * settings.modalities * settings.batch_size * settings.clip
    assert abs(np.mean(totals) - signal) < 4 * np.std(totals) / np.sqrt(len(totals))  # unbiased: 4 standard errors
    assert signal / np.std(totals) == pytest.approx(settings.snr_ceiling, rel=0.15)


def test_site_setting_wins_and_a_job_cannot_choose_dp() -> None:
    assert dp.resolve_privacy(None, "adversarial").mode == "adversarial"
    assert dp.resolve_privacy({"mode": "standard"}, "adversarial").source == "site"
    with pytest.raises(ValueError, match="dp needs the site's own budget"):
        dp.resolve_privacy(None, "dp")
    with pytest.raises(ValueError, match="epsilon"):
        dp.resolve_privacy({"mode": "dp", "steps": 10})
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.resolve_privacy({"mode": "dp", "epsilon": 1})


class _NoNoise:
    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray:
        return np.zeros(size)


def test_filter_clips_every_example_of_a_batch(tmp_path) -> None:
    settings = dp.resolve_privacy({"mode": "dp", "epsilon": 1e6, "clip": 0.5, "noise_multiplier": 1.0},
                                  batch_size=6)
    grads = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    grads[0] *= 1e-3  # already within the norm: unchanged
    out = dp.SiteSanitizer(settings, rng=_NoNoise()).sanitize({"grad/t2": grads})["grad/t2"]
    norms = np.linalg.norm(out.reshape(6, -1), axis=1)
    assert out.dtype == np.float32 and np.all(norms <= 0.5 + 1e-6)
    assert np.allclose(norms[1:], 0.5, atol=1e-5) and np.allclose(out[0], grads[0])
    # with noise: each coordinate gets N(0, (σ·C)²) on top of the clipped example
    noisy = dp.SiteSanitizer(settings, rng=np.random.default_rng(1)).sanitize({"grad/t2": grads})["grad/t2"]
    assert np.std(noisy - out) == pytest.approx(settings.noise_std, rel=0.05)


def test_budget_exhaustion_stops_the_site_and_survives_a_restart(tmp_path) -> None:
    own = {"mode": "dp", "epsilon": 4.0, "delta": 1e-5, "clip": 0.1, "noise_multiplier": 20.0}
    settings = dp.resolve_privacy(own, batch_size=4)
    fits = max(k for k in range(1, 200) if dp.epsilon(settings.accounted_noise_multiplier, 1.0, k, 1e-5) <= 4.0)
    state = tmp_path / "site-1.json"
    sanitizer = dp.SiteSanitizer(settings, state)
    grad = {"grad/t2": np.ones((4, 1, 8, 8), np.float32)}
    for _ in range(fits):
        sanitizer.sanitize(grad)
    with pytest.raises(dp.PrivacyBudgetSpent, match=rf"privacy budget spent: {fits} steps released"):
        sanitizer.sanitize(grad)
    assert sanitizer.steps == fits and sanitizer.epsilon() <= 4.0
    with pytest.raises(dp.PrivacyBudgetSpent):  # a restarted site remembers what it spent
        dp.SiteSanitizer(settings, state).check_budget()


def test_guard_lets_only_the_mode_s_losses_leave() -> None:
    sent = {"fake/t2": ((2, 1, 8, 8), "float32")}
    result = {"grad/t2": np.zeros((2, 1, 8, 8), np.float32), "next_masks": np.zeros((2, 8, 8), np.uint8),
              "losses": {"t2/d": 0.1, "t2/g_adv": 0.2, "t2/g_l1": 0.3, "t2/g": 30.2}}
    assert check_result(wire.TASK_STEP, sent, result, "standard") == []
    assert any("t2/g_l1" in p for p in check_result(wire.TASK_STEP, sent, result, "adversarial"))
    assert check_result(wire.TASK_STEP, sent, result | {"losses": {"t2/d": 0.1}}, "adversarial") == []
    assert any("privacy mode dp" in p for p in check_result(wire.TASK_STEP, sent, result | {"losses": {"t2/d": 0.1}},
                                                            "dp"))
    assert check_result(wire.TASK_STEP, sent, result | {"losses": {}}, "dp") == []


def test_error_replies_carry_a_code_only() -> None:
    leaky = error_reply(ReturnCode.EXECUTION_EXCEPTION, "BratsDataError: /data/Brats18_CBICA_AAB_1/t1.nii.gz")
    assert leaky.get_header(wire.ERROR_HEADER) == wire.ERROR_INTERNAL
    assert error_reply(ReturnCode.EXECUTION_EXCEPTION, wire.ERROR_DATA).get_header(wire.ERROR_HEADER) == wire.ERROR_DATA


class _Stream:
    def __init__(self, batch: SiteBatch) -> None:
        self.batch = batch

    def __next__(self) -> SiteBatch:
        return self.batch


def _batch(n: int = 4, size: int = 32) -> SiteBatch:
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (n, size, size), generator=g).to(torch.uint8)
    brain = torch.ones(n, size, size, dtype=torch.uint8)
    real = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return SiteBatch(mask=mask_channels(label, brain), reals={"t2": real}, label=label, brain=brain)


def test_adversarial_site_never_sends_the_l1_term() -> None:
    """The site executor's step in mode adversarial, against a recomputation from the same discriminator."""
    torch.manual_seed(0)
    model = {"ngf": 8, "n_blocks": 1, "n_downsampling": 2, "ndf": 8, "n_layers_d": 2}
    d = build_discriminator(model)
    opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_copy = copy.deepcopy(d)
    opt_copy = torch.optim.Adam(d_copy.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batch = _batch()
    ex = SiteExecutor(privacy_mode="adversarial")
    ex.site, ex.modalities, ex.loss = "site-1", ["t2"], GanLoss()
    ex.model = SiteModel({"t2": d}, {"t2": opt})
    ex.privacy = dp.resolve_privacy(None, "adversarial", batch_size=4)
    ex.returned = GanLoss(lambda_l1=0.0)
    ex.pending, ex.stream = batch, _Stream(batch)
    ex.settings = type("S", (), {"checkpoint_every": 10**9})()
    fake = (torch.rand(4, 1, 32, 32) * 2 - 1).numpy()
    task = DXO(DataKind.APP_DEFINED, {"fake/t2": fake}).to_shareable()
    task.set_header(wire.ITERATION, 1)
    result = ex._step(task, None, Signal())
    sent = torch.from_numpy(from_shareable(result).data["grad/t2"])
    assert result.get_header(wire.PRIVACY_HEADER) == "adversarial"
    assert set(from_shareable(result).data["losses"]) == {"t2/d", "t2/g_adv"}
    # recompute: the same discriminator update, then the gradient with and without the L1 term
    full, _ = site_step(d_copy, opt_copy, batch.mask, batch.reals["t2"], torch.from_numpy(fake), GanLoss())
    adv_only = full - torch.autograd.grad(
        100.0 * torch.nn.functional.l1_loss(leaf := torch.from_numpy(fake).clone().requires_grad_(True),
                                            batch.reals["t2"]), leaf)[0]
    assert torch.allclose(sent, adv_only, atol=1e-7)
    l1_part = full - adv_only
    assert l1_part.abs().min() > 0 and not torch.allclose(sent, full)
    # the sign map the L1 term would have sent is not in what was sent
    agreement = (torch.sign(sent) == torch.sign(l1_part)).float().mean()
    assert agreement < 0.9
