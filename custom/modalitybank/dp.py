"""Privacy modes of a site, and differential privacy of what it returns (GS-WGAN's gradient sanitiser).

A site chooses, in its own settings (``local/modalitybank_site.json`` → ``"privacy"``), what its
gradients w.r.t. the server's fakes may carry:

* ``standard`` — the paper: adversarial + λ·L1 (the L1 term's gradient is λ/(N·P)·sign(fake − real),
  a sign map of the real image);
* ``adversarial`` — the adversarial loss's gradient only; no L1 term, no L1 loss value leaves;
* ``dp`` — every example's gradient (one slice of the batch, per modality) clipped to L2 norm ``C``
  and Gaussian noise of standard deviation ``σ·C`` added to each coordinate, as GS-WGAN sanitises
  ``∂L_G/∂x̃`` (Chen, Orekondy, Fritz, NeurIPS 2020). (ε, δ) is accounted with Google's
  ``dp-accounting`` RDP accountant, not by our own code; no loss value leaves.

**What is accounted, and why the sampling rate is 1.** The privacy unit is one training slice (its
image in every modality the site holds); its mask is *not* protected: masks leave the site in the
clear, so the server knows exactly which slices make up every batch. Two consequences:

1. the server sees which slices are in a batch, so there is no amplification by sub-sampling to
   claim: the accountant is given sampling rate ``q = 1`` (a DP-SGD-style ``q = B/n`` would assume
   the batch composition is secret; here it is not);
2. the site's discriminators are trained on every slice, non-privately, and stay inside the site:
   after a slice has been seen, *every* later example's gradient may depend on it. So the L2
   sensitivity of one step's release (``M`` modalities × ``B`` examples, each clipped to ``C``) under
   replacing one slice is ``Δ = 2·C·√(M·B)`` (GS-WGAN composes ``B`` per-example Gaussians per step for
   the same reason), and the step is a Gaussian mechanism with noise multiplier ``z = σ·C/Δ = σ/(2√(MB))``.

``T`` steps compose: the accountant composes ``T`` Gaussian mechanisms of multiplier ``z``. GS-WGAN
obtains sub-sampling amplification (rate ``1/K``) from ``K`` discriminators on disjoint data; with
the masks public it would not be amplification here, and one discriminator per modality is what
this product runs.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MODES", "PrivacyBudgetSpent", "PrivacySettings", "SiteSanitizer", "accountant", "clip_per_example",
    "epsilon", "noise_multiplier_for", "resolve_privacy", "snr_ceiling",
]

#: The privacy modes a site may choose.
MODES = ("standard", "adversarial", "dp")
#: RDP orders: dp-accounting's defaults extended to large orders (needed for small ε with many steps).
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512, 1024])


class PrivacyBudgetSpent(RuntimeError):
    """A ``dp`` site's next release would exceed its (ε, δ) budget: it stops contributing."""


def accountant(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
    """dp-accounting's RDP accountant after ``steps`` Gaussian mechanisms of ``noise_multiplier``
    (noise std / L2 sensitivity), each Poisson-sub-sampled at ``sampling_rate`` (1: no sub-sampling)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    acc = RdpAccountant(list(ORDERS))
    if steps > 0:
        acc.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    return acc


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            conversion: str = "improved") -> float:
    """ε of ``steps`` (sub-sampled) Gaussian mechanisms at ``delta``, from dp-accounting's RDP accountant.

    Args:
        noise_multiplier: noise std divided by the L2 sensitivity of one step.
        sampling_rate: Poisson sampling probability of each record per step; 1 for none.
        steps: how many steps compose.
        delta: the δ of (ε, δ).
        conversion: ``"improved"`` (what the site reports: dp-accounting's RDP → (ε, δ) conversion,
            Balle et al. 2020), or ``"classical"`` (Mironov 2017, Prop. 3: min over orders α of
            RDP(α) + log(1/δ)/(α − 1), the conversion of Abadi et al.'s moments accountant and of
            TF Privacy's published tables; looser, for comparison with them).
    """
    if steps <= 0:
        return 0.0
    acc = accountant(noise_multiplier, sampling_rate, steps)
    if conversion == "improved":
        return float(acc.get_epsilon(delta))
    if conversion == "classical":
        orders, rdp = np.asarray(acc.orders, float), np.asarray(acc.rdp, float)
        return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    raise ValueError(f"conversion must be 'improved' or 'classical', not {conversion!r}")


def noise_multiplier_for(target_epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` composed steps stay within ``target_epsilon`` at ``delta``
    (dp-accounting's ``calibrate_dp_mechanism``)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    def event(z: float) -> Any:
        e: Any = dp_accounting.GaussianDpEvent(z)
        if sampling_rate < 1.0:
            e = dp_accounting.PoissonSampledDpEvent(sampling_rate, e)
        return dp_accounting.SelfComposedDpEvent(e, int(steps))

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(list(ORDERS)), event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))


def snr_ceiling(target_epsilon: float, delta: float, steps: int) -> float:
    """The most signal a whole ``dp`` run of ``steps`` releases at (ε, δ) can carry along any direction of the
    generator's parameters, in standard deviations of the noise along it: ``√T / (2·z)``, ``z`` the accounted
    noise multiplier (:func:`noise_multiplier_for`, sampling rate 1).

    Why: the server's update is ``Σ_e J_eᵀ(g_e + n_e)`` over the ``N = T·M·B`` released examples, each
    ``g_e`` clipped to ``C`` and each ``n_e`` Gaussian of std ``σ·C`` per coordinate, ``σ = 2·z·√(M·B)``
    (:func:`resolve_privacy`). Along a unit direction ``u`` the signal is at most ``C·Σ‖J_e u‖`` and the
    noise's std is ``σ·C·√(Σ‖J_e u‖²)``; by Cauchy–Schwarz their ratio is at most ``√N / σ = √T / (2z)``,
    whatever the generator, ``M``, ``B`` or the images. The RDP of ``T`` composed Gaussians depends on
    ``T / z²`` alone, so at fixed (ε, δ) ``z`` grows exactly like ``√T`` and the ceiling does not depend on
    ``T`` (about ``ε / (2√(2 ln(1/δ)))``): more iterations or more slices buy no utility; only a smaller
    sensitivity (a protocol in which one slice changes only its own examples, with a sampling rate below 1)
    would.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return math.sqrt(steps) / (2.0 * noise_multiplier_for(target_epsilon, delta, 1.0, steps))


def clip_per_example(grad: np.ndarray, clip: float) -> np.ndarray:
    """Scale each example (first axis) of ``grad`` to L2 norm at most ``clip``; smaller ones unchanged."""
    flat = grad.reshape(grad.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return (flat * scale).reshape(grad.shape)


@dataclass(frozen=True)
class PrivacySettings:
    """A site's effective privacy mode and, for ``dp``, its parameters.

    Attributes:
        mode: ``standard``, ``adversarial`` or ``dp``.
        source: where the mode came from: ``site`` (the site's own settings) or ``job`` (the job's fallback).
        epsilon: the (ε, δ) budget's ε; the site stops contributing before it would exceed it.
        delta: the budget's δ.
        clip: per-example L2 clipping norm ``C`` of the returned gradients.
        noise_multiplier: ``σ``: per-coordinate noise std is ``σ·C``; computed from ``epsilon`` for
            ``steps`` planned steps when not given.
        steps: planned steps (releases) the budget is sized for.
        batch_size: examples per step ``B``; ``modalities``: gradients per example ``M``.
    """

    mode: str = "standard"
    source: str = "job"
    epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 0.1
    noise_multiplier: float = 0.0
    steps: int = 0
    batch_size: int = 1
    modalities: int = 1

    @property
    def noise_std(self) -> float:
        """Per-coordinate noise standard deviation ``σ·C``."""
        return self.noise_multiplier * self.clip

    @property
    def accounted_noise_multiplier(self) -> float:
        """Noise std over one step's L2 sensitivity ``2·C·√(M·B)``: ``σ / (2√(M·B))``."""
        return self.noise_multiplier / (2.0 * math.sqrt(self.modalities * self.batch_size))

    @property
    def snr_ceiling(self) -> float | None:
        """:func:`snr_ceiling` of these settings over their planned ``steps``: ``√(T·M·B) / σ`` (``None``
        outside ``dp`` or without planned steps)."""
        if self.mode != "dp" or self.steps <= 0 or self.noise_multiplier <= 0:
            return None
        return math.sqrt(self.steps * self.modalities * self.batch_size) / self.noise_multiplier

    def describe(self) -> dict[str, Any]:
        """What the site tells the server (and its ledger) about its mode."""
        out: dict[str, Any] = {"mode": self.mode, "source": self.source}
        if self.mode == "dp":
            out |= {"epsilon": float(self.epsilon), "delta": float(self.delta), "clip": float(self.clip),
                    "noise_multiplier": float(self.noise_multiplier), "noise_std": float(self.noise_std),
                    "sampling_rate": 1.0}
        return out


def resolve_privacy(own: dict[str, Any] | str | None, job_default: str = "standard", batch_size: int = 1,
                    modalities: int = 1) -> PrivacySettings:
    """The effective settings: the site's own ``"privacy"`` section wins over the job's fallback mode.

    Args:
        own: the site's own ``"privacy"`` settings: a mode name, or e.g. ``{"mode": "dp", "epsilon": 8,
            "delta": 1e-5, "clip": 0.1, "steps": 150}`` (σ computed so that ``steps`` releases spend ε) or
            with ``"noise_multiplier"`` (σ) given instead of ``steps``.
        job_default: the job's fallback: ``standard`` or ``adversarial`` (``dp`` needs the site's own budget).
        batch_size: examples per release ``B``.
        modalities: gradients per example ``M`` (the modalities the site answers for).

    Raises:
        ValueError: unknown mode or keys, or a ``dp`` section without ε, or without σ and steps.
    """
    if job_default not in ("standard", "adversarial"):
        raise ValueError(f"a job's privacy mode may be 'standard' or 'adversarial' (dp needs the site's own "
                         f"budget), not {job_default!r}")
    if not own:
        return PrivacySettings(mode=job_default, source="job", batch_size=batch_size, modalities=modalities)
    if isinstance(own, str):
        own = {"mode": own}
    unknown = set(own) - {"mode", "epsilon", "delta", "clip", "noise_multiplier", "steps"}
    if unknown:
        raise ValueError(f"privacy settings: unknown keys {sorted(unknown)}")
    mode = own.get("mode", "standard")
    if mode not in MODES:
        raise ValueError(f"privacy mode must be one of {MODES}, not {mode!r}")
    if mode != "dp":
        return PrivacySettings(mode=mode, source="site", batch_size=batch_size, modalities=modalities)
    if "epsilon" not in own:
        raise ValueError("privacy mode dp needs an 'epsilon' budget (and 'delta', default 1e-5)")
    eps, delta, clip = float(own["epsilon"]), float(own.get("delta", 1e-5)), float(own.get("clip", 0.1))
    if "noise_multiplier" not in own and "steps" not in own:
        raise ValueError("privacy mode dp needs 'noise_multiplier' or the 'steps' its budget is sized for")
    steps = int(own.get("steps", 0))
    if not (eps > 0 and 0 < delta < 1 and clip > 0 and steps >= 0):
        raise ValueError(f"privacy dp: need epsilon > 0, 0 < delta < 1, clip > 0, steps >= 0 (got {own})")
    sensitivity_factor = 2.0 * math.sqrt(modalities * batch_size)
    if "noise_multiplier" in own:
        sigma = float(own["noise_multiplier"])
        if sigma <= 0:
            raise ValueError("privacy dp: noise_multiplier must be > 0")
    else:
        sigma = noise_multiplier_for(eps, delta, 1.0, steps) * sensitivity_factor
    return PrivacySettings(mode="dp", source="site", epsilon=eps, delta=delta, clip=clip, noise_multiplier=sigma,
                           steps=steps, batch_size=batch_size, modalities=modalities)


class SiteSanitizer:
    """The ``dp`` release of one site: per-example clipping, Gaussian noise, and the budget.

    Every released step is counted (in ``state_path`` when given, so that a restarted site, or a later
    job on the same data, keeps spending the same budget); :meth:`check_budget` refuses the step that
    would take ε past the target.

    Args:
        settings: the site's ``dp`` settings.
        state_path: JSON file of the steps released so far (created; appended to across runs).
        rng: noise source; default: a generator seeded from the OS's entropy.
    """

    def __init__(self, settings: PrivacySettings, state_path: str | Path | None = None,
                 rng: np.random.Generator | None = None) -> None:
        if settings.mode != "dp":
            raise ValueError("SiteSanitizer is for privacy mode dp")
        self.settings = settings
        self.state_path = Path(state_path) if state_path else None
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.history: list[dict[str, float]] = []  # releases of earlier settings (other σ, B, M)
        if self.state_path and self.state_path.is_file():
            self.history = json.loads(self.state_path.read_text())["releases"]
        self._key = {"noise_multiplier": round(settings.accounted_noise_multiplier, 12), "sampling_rate": 1.0}
        self._current = next((h for h in self.history if _same(h, self._key)), None)
        if self._current is None:
            self._current = {**self._key, "steps": 0}
            self.history.append(self._current)

    @property
    def steps(self) -> int:
        """Steps released under the current settings."""
        return int(self._current["steps"])

    def epsilon(self, extra_steps: int = 0) -> float:
        """ε spent so far (plus ``extra_steps`` more of the current settings), at the settings' δ."""
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        acc = RdpAccountant(list(ORDERS))
        for h in self.history:
            steps = int(h["steps"]) + (extra_steps if h is self._current else 0)
            if steps:
                event: Any = dp_accounting.GaussianDpEvent(h["noise_multiplier"])
                if h["sampling_rate"] < 1:
                    event = dp_accounting.PoissonSampledDpEvent(h["sampling_rate"], event)
                acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(acc.get_epsilon(self.settings.delta))

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetSpent` if one more step would exceed the budget."""
        after = self.epsilon(1)
        if after > float(self.settings.epsilon) + 1e-9:
            raise PrivacyBudgetSpent(
                f"privacy budget spent: {self.steps} steps released, ε = {self.epsilon():.3f}; one more would make "
                f"ε = {after:.3f} > {self.settings.epsilon:g} at δ = {self.settings.delta:g}")

    def sanitize(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step's gradients ``{key: (B, ...)}``: each example clipped to ``C`` and noised (``σ·C``), each
        cast back to its own dtype; counts the step. Raises :class:`PrivacyBudgetSpent` first if the budget
        does not allow it."""
        self.check_budget()
        out = {}
        for key, g in grads.items():
            clipped = clip_per_example(g, self.settings.clip)
            noisy = clipped + self.rng.normal(0.0, self.settings.noise_std, size=clipped.shape)
            out[key] = np.ascontiguousarray(noisy.astype(g.dtype))
        self._current["steps"] = self.steps + 1
        self._save()
        return out

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"releases": self.history, "delta": self.settings.delta,
                                   "settings": asdict(self.settings)}, indent=1))
        tmp.replace(self.state_path)


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(abs(float(a[k]) - float(b[k])) < 1e-9 for k in b)
