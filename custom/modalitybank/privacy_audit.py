"""Leakage audit: the honest-but-curious server, on exactly what it receives, per privacy mode.

For each mode (``standard``, ``adversarial``, ``dp`` at each ε), one site (data centre CBICA, one
target modality) learns its bank entry with the server for ``iterations`` steps, in one process but
through the site's own code paths: :func:`modalitybank.gan.site_step` (its discriminator update and
the returned gradient of its mode), the losses its mode lets leave
(:data:`modalitybank.fl.privacy.LOSSES_ALLOWED`), the guard's :func:`~modalitybank.fl.privacy.check_result`
and, in ``dp``, the guard's sanitiser (:class:`modalitybank.dp.SiteSanitizer`). The server keeps, per
slice (it knows slices by their masks, which it receives), every fake it sent and every gradient and
loss it got back, and then attacks:

* **reconstruction** of each real training image from what it received, the best mean PSNR of:
  ``sign`` (the L1 term's gradient is λ/(N·P)·sign(fake − real): real ≈ fake − sign(g)·ℓ, with ℓ the
  reported L1 loss, or the best of a grid when none is reported), ``interval`` (the sign of every
  iteration bounds the real pixel between the fakes above and below it), ``inversion`` (DLG-style:
  optimise an image whose L1-term gradients match the observed ones over all iterations, with a
  total-variation prior), ``step`` and ``step_avg`` (move the fake against the returned gradient, the
  last one, or averaged over the iterations of the slice). Free parameters (grid values) are chosen
  with the real images in hand, so the figure is an upper bound on these attacks. The server's own
  fake for the mask (no gradient used) is reported beside it as ``psnr_fake``: what the generator
  knows of any brain with that mask is not leakage of that image.
* **memorisation**: synthetic images for other patients' masks, their nearest training image against
  their nearest held-out image (same centre, equal set sizes).
* **membership inference**: AUC of a distance attack with the released generator (score
  ``−L1(G(mask), image)``) on training against held-out slices of the same centre. (Which *masks* were
  in training the server knows exactly: masks leave the site.)
* **utility**: held-out L1 / PSNR / SSIM of the learned modality (every centre's test cases).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalitybank import config
from modalitybank.dp import PrivacySettings, SiteSanitizer, resolve_privacy
from modalitybank.fl import wire
from modalitybank.fl.privacy import LOSSES_ALLOWED, check_result
from modalitybank.gan import generator_step, site_step
from modalitybank.networks import mask_channels
from modalitybank.training import BatchStream, TrainSettings, make_site_models

__all__ = ["ATTACKS", "audit", "format_table"]

ATTACKS = ("sign", "interval", "inversion", "step", "step_avg")
CENTRE = "CBICA"


@dataclass
class _Slice:
    """What the server holds about one training slice (keyed by its mask), and the truth for scoring."""

    real: np.ndarray
    fakes: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)
    l1: list[float | None] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = float(np.mean((np.clip(x, -1, 1) - y) ** 2))
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    from monai.metrics import SSIMMetric

    metric = SSIMMetric(spatial_dims=2, data_range=2.0, reduction="mean")
    return float(metric(torch.from_numpy(np.clip(x, -1, 1)).float()[None], torch.from_numpy(y).float()[None]).mean())


def _auc(members: np.ndarray, others: np.ndarray) -> float:
    """ROC AUC of scores (higher: member) by the Mann–Whitney statistic."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([members, others]))
    n1, n0 = len(members), len(others)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# -- the attacks ------------------------------------------------------------------------------
def _sign(s: _Slice, scale: float | None) -> np.ndarray:
    ell = s.l1[-1] if scale is None else scale
    return s.fakes[-1] - np.sign(s.grads[-1]) * ell


def _interval(s: _Slice) -> np.ndarray:
    fakes, signs = np.stack(s.fakes), np.sign(np.stack(s.grads))
    above = np.where(signs > 0, fakes, np.inf).min(axis=0)  # fake > real where the sign is +
    below = np.where(signs < 0, fakes, -np.inf).max(axis=0)
    both = np.isfinite(above) & np.isfinite(below)
    est = np.where(both, (np.minimum(above, 1) + np.maximum(below, -1)) / 2, s.fakes[-1])
    est = np.where(~both & np.isfinite(above), above - 0.05, est)
    return np.where(~both & np.isfinite(below), below + 0.05, est)


def _inversion(slices: list[_Slice], lambda_l1: float, steps: int = 200, tv: float = 0.02) -> list[np.ndarray]:
    """DLG-style, all slices at once: the images whose (smoothed) L1-term gradients best match the observed
    gradients of every iteration, with a total-variation prior."""
    k = max(len(s.fakes) for s in slices)
    shape = slices[0].real.shape
    fakes = torch.zeros(len(slices), k, *shape)
    grads = torch.zeros(len(slices), k, *shape)
    weight = torch.zeros(len(slices), k, *([1] * len(shape)))
    for i, s in enumerate(slices):
        n = len(s.fakes)
        fakes[i, :n] = torch.from_numpy(np.stack(s.fakes))
        amp = torch.tensor([lambda_l1 / (b * s.real.size) for b in s.batch]).view(-1, *([1] * len(shape)))
        grads[i, :n] = torch.from_numpy(np.stack(s.grads)) / amp  # ≈ sign(fake − real) (+ adversarial, + noise)
        weight[i, :n] = 1.0
    last = torch.from_numpy(np.stack([s.fakes[-1] for s in slices])).float()
    x = torch.atanh(last.clamp(-0.99, 0.99)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        img = torch.tanh(x)
        model = torch.tanh((fakes - img[:, None]) / 0.05)
        match = (weight * (model - grads) ** 2).sum() / (weight.sum() * float(np.prod(shape)))
        loss = match + tv * ((img[..., 1:, :] - img[..., :-1, :]).abs().mean()
                             + (img[..., :, 1:] - img[..., :, :-1]).abs().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return list(torch.tanh(x).detach().numpy())


def _step(s: _Slice, eta: float, average: bool) -> np.ndarray:
    ests = [f - eta * g / max(float(np.sqrt(np.mean(g ** 2))), 1e-12) for f, g in zip(s.fakes, s.grads, strict=True)]
    return np.mean(ests, axis=0) if average else ests[-1]


def _reconstruct(slices: list[_Slice], lambda_l1: float) -> dict[str, dict[str, Any]]:
    """Every attack on every slice; grid parameters chosen for the best mean PSNR (an upper bound)."""
    reals = [s.real for s in slices]

    def score(ests: list[np.ndarray]) -> float:
        return float(np.mean([_psnr(e, r) for e, r in zip(ests, reals, strict=True)]))

    out: dict[str, dict[str, Any]] = {}

    def best(name: str, candidates: dict[Any, list[np.ndarray]]) -> None:
        param, ests = max(candidates.items(), key=lambda kv: score(kv[1]))
        out[name] = {"estimates": ests, "param": param, "psnr": score(ests)}

    reported = all(s.l1[-1] is not None for s in slices)
    grid = {None: [_sign(s, None) for s in slices]} if reported else {}
    grid |= {v: [_sign(s, v) for s in slices] for v in (0.02, 0.05, 0.1, 0.2)}
    best("sign", grid)
    best("interval", {None: [_interval(s) for s in slices]})
    best("inversion", {None: _inversion(slices, lambda_l1)})
    etas = (0.01, 0.03, 0.1, 0.3)
    best("step", {eta: [_step(s, eta, False) for s in slices] for eta in etas})
    best("step_avg", {eta: [_step(s, eta, True) for s in slices] for eta in etas})
    return out


# -- one mode ---------------------------------------------------------------------------------
def _train(mode: str, privacy: PrivacySettings, data: dict[str, Any], pretrained: Path, scale: str, modality: str,
           iterations: int, seed: int) -> tuple[Any, dict[bytes, _Slice], float | None]:
    """The site and the server for ``iterations`` steps; returns the generator, the server's observations
    per slice and the ε the site spent (dp)."""
    from modalitybank.store import load_generator

    torch.manual_seed(seed)
    settings = TrainSettings.from_preset(scale, "bank", seed=seed, iterations=iterations)
    generator = load_generator(pretrained)
    g_opt = settings.adam(generator.bank.learn([modality]))
    site = make_site_models({CENTRE: [modality]}, config.preset(scale)["model"], settings)[CENTRE]
    loss = settings.gan_loss()
    returned = loss.adversarial_only() if mode == "adversarial" else None
    sanitizer = SiteSanitizer(privacy, rng=np.random.default_rng(seed)) if mode == "dp" else None
    stream = BatchStream(data["train"], settings.batch_size, seed)
    seen: dict[bytes, _Slice] = {}
    for _ in range(iterations):
        batch = next(stream)
        codes = wire.encode_masks(batch.label, batch.brain)  # what the server received (and makes fakes from)
        label, brain = wire.decode_masks(codes)
        generator.train()
        fake = generator.generate(mask_channels(label, brain), [modality])[modality]
        sent = wire.to_wire(fake, "float32")
        grad, losses = site_step(site.discriminators[modality], site.optimizers[modality], batch.mask,
                                 batch.reals[modality], wire.from_wire(sent), loss, returned)
        out: dict[str, Any] = {wire.grad_key(modality): wire.to_wire(grad, "float32"), wire.NEXT_MASKS: codes,
                               wire.LOSSES: {f"{modality}/{k}": float(v) for k, v in losses.items()
                                             if k in LOSSES_ALLOWED[mode]}}
        problems = check_result(wire.TASK_STEP, {wire.fake_key(modality): (sent.shape, str(sent.dtype))}, out, mode)
        if problems:
            raise RuntimeError(f"the guard would block this step: {problems}")
        if sanitizer is not None:
            out |= sanitizer.sanitize({wire.grad_key(modality): out[wire.grad_key(modality)]})
        received = out[wire.grad_key(modality)]
        generator_step(g_opt, [fake], [wire.from_wire(received)])
        l1 = out[wire.LOSSES].get(f"{modality}/g_l1")
        for i in range(len(codes)):
            s = seen.setdefault(codes[i].tobytes(), _Slice(real=batch.reals[modality][i].numpy()))
            s.fakes.append(sent[i])
            s.grads.append(received[i])
            s.l1.append(l1)
            s.batch.append(len(codes))
    return generator, seen, sanitizer.epsilon() if sanitizer else None


@torch.no_grad()
def _fakes(generator: Any, dataset: Any, modality: str) -> np.ndarray:
    generator.eval()
    return generator.generate(mask_channels(dataset.labels, dataset.brains), [modality])[modality].numpy()


def _privacy_of(generator: Any, reference: Any, data: dict[str, Any], modality: str, seed: int) -> dict[str, Any]:
    """Memorisation and membership inference with the released generator (``reference``: the pre-trained one,
    which the server holds too); the membership AUC is the better of the two attacks."""
    train, held, other = data["train"], data["heldout"], data["other"]
    real_train, real_held = train.images[:, :1].numpy(), held.images[:, :1].numpy()
    # membership: -L1(G(mask), image), training against held-out slices of the same centre
    def distance(g: Any, dataset: Any, real: np.ndarray) -> np.ndarray:
        return np.abs(_fakes(g, dataset, modality) - real).mean(axis=(1, 2, 3))

    score_train, score_held = -distance(generator, train, real_train), -distance(generator, held, real_held)
    # calibrated by the pre-trained generator the server also holds: how much closer training made each image
    calib_train = score_train + distance(reference, train, real_train)
    calib_held = score_held + distance(reference, held, real_held)
    # memorisation: synthetic images of other patients' masks, nearest training vs nearest held-out image
    syn = _fakes(generator, other, modality).reshape(len(other), -1)
    rng = np.random.default_rng(seed)
    n = min(len(real_train), len(real_held))
    ratios, d_train, d_held = [], [], []
    for _ in range(10):
        a = real_train[rng.choice(len(real_train), n, replace=False)].reshape(n, -1)
        b = real_held[rng.choice(len(real_held), n, replace=False)].reshape(n, -1)
        dt = np.sqrt(((syn[:, None] - a[None]) ** 2).mean(-1)).min(1)
        dh = np.sqrt(((syn[:, None] - b[None]) ** 2).mean(-1)).min(1)
        d_train.append(dt.mean())
        d_held.append(dh.mean())
        ratios.append(dt.mean() / dh.mean())
    aucs = {"distance": _auc(score_train, score_held), "calibrated": _auc(calib_train, calib_held)}
    return {"mia_auc": max(aucs.values()), "mia_attack": max(aucs, key=aucs.get),
            "mia_aucs": {k: round(v, 4) for k, v in aucs.items()}, "nn_train": float(np.mean(d_train)),
            "nn_heldout": float(np.mean(d_held)), "nn_ratio": float(np.mean(ratios)),
            "members": len(train), "non_members": len(held)}


def audit(scale: str = "tiny", out_dir: str | Path = "runs/privacy_audit", iterations: int | None = None,
          epsilons: tuple[float, ...] = (1.0, 8.0), delta: float = 1e-5, clip: float = 0.1,
          modality: str = "flair", seed: int = 0, data_root: str | Path | None = None,
          pretrained: str | Path | None = None, cache_dir: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run the audit (see the module docstring); writes ``audit.json`` and ``reconstructions.png`` into ``out_dir``.

    Args:
        scale: size preset (``tiny`` or ``small``).
        out_dir: where the figure and the JSON go.
        iterations: steps per mode (default: the preset's ``bank_iterations``).
        epsilons: the ε of each ``dp`` run (σ computed for ``iterations`` steps at ``delta``).
        delta: δ of the ``dp`` runs.
        clip: per-example clipping norm ``C`` of the ``dp`` runs.
        modality: the target modality learned (the generator is pre-trained on T1c).
        seed: data order, initialisation and noise.
        data_root, pretrained, cache_dir: the data (default: the embedded phantom), the pre-trained
            generator (default: pre-trained once on it) and the slice cache.
        progress: print a line per mode on stderr.

    Returns:
        ``{"modes": {mode: {"psnr", "ssim", "mia_auc", "epsilon", ...}}, "reference": ..., "figure", ...}``.
    """
    import sys

    from modalitybank.data import default
    from modalitybank.data.brats import SiteDataset, slice_settings
    from modalitybank.store import load_generator
    from modalitybank.synthesis import evaluate_generator

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root else default.default_phantom(scale, seed)
    pretrained = Path(pretrained) if pretrained else default.default_pretrained(scale, seed, data_root=root)
    cache = Path(cache_dir) if cache_dir else config.CACHE_ROOT / "slices"
    # tumour slices only: the patient-specific part of an image, what an attack on a site would target
    kw = {"cache_dir": cache, **slice_settings(scale, background_slices_per_case=0)}
    data = {"train": SiteDataset(root, CENTRE, [modality], split="train", **kw),
            "heldout": SiteDataset(root, CENTRE, [modality], split="test", **kw),
            "other": SiteDataset(root, "TCIA", [modality], split="train", **kw),
            "test": SiteDataset(root, None, [modality], split="test", **kw)}
    settings = TrainSettings.from_preset(scale, "bank", seed=seed, iterations=iterations)
    iterations = settings.iterations
    batch = min(settings.batch_size, len(data["train"]))
    modes: dict[str, tuple[str, PrivacySettings]] = {
        "standard": ("standard", resolve_privacy({"mode": "standard"}, batch_size=batch)),
        "adversarial": ("adversarial", resolve_privacy({"mode": "adversarial"}, batch_size=batch))}
    for eps in sorted(epsilons, reverse=True):
        modes[f"dp-eps{eps:g}"] = ("dp", resolve_privacy({"mode": "dp", "epsilon": eps, "delta": delta, "clip": clip,
                                                         "steps": iterations}, batch_size=batch))
    reference = load_generator(pretrained)
    reference.bank.learn([modality])  # the identity entry: the pre-trained generator as it is
    result: dict[str, Any] = {
        "scale": scale, "modality": modality, "centre": CENTRE, "iterations": iterations, "batch_size": batch,
        "train_slices": len(data["train"]), "delta": delta, "clip": clip,
        "reference": {"heldout": evaluate_generator(reference, data["test"], [modality])[modality],
                      **_privacy_of(reference, reference, data, modality, seed)},
        "modes": {}}
    shown: dict[str, list[np.ndarray]] = {}
    reals: list[np.ndarray] = []
    for name, (mode, privacy) in modes.items():
        t = time.perf_counter()
        generator, seen, eps = _train(mode, privacy, data, pretrained, scale, modality, iterations, seed)
        slices = list(seen.values())
        attacks = _reconstruct(slices, settings.lambda_l1)
        best = max(attacks, key=lambda a: attacks[a]["psnr"])
        ests = attacks[best]["estimates"]
        fake_psnr = float(np.mean([_psnr(s.fakes[-1], s.real) for s in slices]))
        row = {"psnr": round(attacks[best]["psnr"], 3),
               "ssim": round(float(np.mean([_ssim(e, s.real) for e, s in zip(ests, slices, strict=True)])), 4),
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in _privacy_of(generator, reference, data,
                                                                                        modality, seed).items()},
               "epsilon": None if eps is None else round(eps, 4),
               "best_attack": best, "psnr_fake": round(fake_psnr, 3),
               "attacks": {a: {"psnr": round(v["psnr"], 3), "param": v["param"]} for a, v in attacks.items()},
               "noise_multiplier": round(privacy.noise_multiplier, 3) if mode == "dp" else None,
               "snr_ceiling": None if privacy.snr_ceiling is None else round(privacy.snr_ceiling, 4),
               "heldout": evaluate_generator(generator, data["test"], [modality])[modality],
               "observed_slices": len(slices), "seconds": round(time.perf_counter() - t, 1)}
        result["modes"][name] = row
        order = sorted(range(len(slices)), key=lambda i: -float(np.abs(slices[i].real).mean()))[:4]
        shown[name] = [ests[i][0] for i in order]
        if not reals:
            reals = [slices[i].real[0] for i in order]
        if progress:
            print(f"privacy audit {name}: reconstruction {row['psnr']:.1f} dB ({best}), MIA AUC {row['mia_auc']:.2f}, "
                  f"held-out PSNR {row['heldout']['psnr']:.1f} dB, ε {row['epsilon']}", file=sys.stderr)
    result["figure"] = str(_figure(reals, shown, out_dir / "reconstructions.png"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "audit.json").write_text(json.dumps(result, indent=1))
    return result


def _figure(reals: list[np.ndarray], shown: dict[str, list[np.ndarray]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("real", reals)] + [(f"{k}: best reconstruction", v) for k, v in shown.items()]
    fig, axes = plt.subplots(len(rows), len(reals), figsize=(2 * len(reals), 2 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r][c]
            ax.imshow(np.clip(img, -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(result: dict[str, Any]) -> str:
    """The audit as a Markdown table."""
    head = ("| mode | ε (δ = {delta:g}) | best reconstruction PSNR / SSIM (attack) | server's fake PSNR | MIA AUC | "
            "NN train / held-out | held-out L1 / PSNR / SSIM |").format(delta=result["delta"])
    lines = [head, "|" + " --- |" * 7]
    ref = result["reference"]
    lines.append(f"| pre-trained only (no site data) | – | – | – | {ref['mia_auc']:.2f} | {ref['nn_train']:.3f} / "
                 f"{ref['nn_heldout']:.3f} | {ref['heldout']['l1']:.3f} / {ref['heldout']['psnr']:.1f} / "
                 f"{ref['heldout']['ssim']:.2f} |")
    for name, r in result["modes"].items():
        eps = "∞ (not private)" if r["epsilon"] is None else (
            f"{r['epsilon']:.2f} (σ = {r['noise_multiplier']:.0f}; signal/noise ≤ {r['snr_ceiling']:.2f})")
        h = r["heldout"]
        lines.append(f"| {name} | {eps} | {r['psnr']:.1f} dB / {r['ssim']:.2f} ({r['best_attack']}) | "
                     f"{r['psnr_fake']:.1f} dB | {r['mia_auc']:.2f} | {r['nn_train']:.3f} / {r['nn_heldout']:.3f} | "
                     f"{h['l1']:.3f} / {h['psnr']:.1f} / {h['ssim']:.2f} |")
    return "\n".join(lines)
