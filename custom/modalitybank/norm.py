"""The generator's instance norm, with its statistics taken inside the brain, eager or compiled.

The norm is a chain of elementwise passes and reductions over full-resolution feature maps; run
op by op it was about half of a bank iteration's generator time on a 2-core CPU (the small
preset: batch 24, 16 channels at 120²). ``torch.compile`` fuses it into a few kernels
(forward and backward), the same statistics to float32 rounding. Whether a generator uses the
compiled kernel is its ``compile`` setting (:data:`COMPILE_MODES`, the presets' ``model.compile``);
TorchScript always runs the eager code.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modalitybank.config import one_of

__all__ = ["COMPILE_MODES", "BrainInstanceNorm", "brain_instance_norm", "check_compile", "compile_available",
           "compiled_norm_enabled"]

#: ``"never"``: eager. ``"always"``: compiled (fails where ``torch.compile`` cannot build kernels).
#: ``"auto"``: compiled where it can (:func:`compile_available`), eager elsewhere.
COMPILE_MODES = ("never", "always", "auto")


def check_compile(mode: str) -> str:
    return one_of("compile", mode, COMPILE_MODES)


@functools.cache
def compile_available(device_type: str) -> bool:
    """Whether ``torch.compile``'s default backend (inductor) can build kernels for ``device_type``: a C++
    compiler for ``"cpu"``, Triton for ``"cuda"``."""
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device_type != "cpu":
        return False
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # no compiler on the path (the finder raises its own error types)
        return False
    return True


def compiled_norm_enabled(mode: str, device_type: str) -> bool:
    """Whether a norm with ``compile`` setting ``mode`` runs the compiled kernel on ``device_type``."""
    return check_compile(mode) == "always" or (mode == "auto" and compile_available(device_type))


def brain_instance_norm(x: torch.Tensor, brain: torch.Tensor, masked: bool = True, min_weight: float = 4.0,
                        eps: float = 1e-5) -> torch.Tensor:
    """:class:`BrainInstanceNorm`'s computation (arguments and shapes there), as one function."""
    return _normalise(x.reshape(x.shape[0], x.shape[1], -1), _brain_weights(x, brain, masked), min_weight,
                      eps).reshape(x.shape)


def _brain_weights(x: torch.Tensor, brain: torch.Tensor, masked: bool) -> torch.Tensor | None:
    """The brain's share of each pixel of ``x``'s feature map, ``(N, 1, L)`` float32 (``None`` unless ``masked``).
    Outside the compiled kernel: area resampling has no kernel for symbolic sizes, and the kernel then serves
    every feature size and batch."""
    if not masked:
        return None
    return F.interpolate(brain.float(), size=x.shape[2:], mode="area").reshape(x.shape[0], 1, -1)


def _normalise(flat: torch.Tensor, w: torch.Tensor | None, min_weight: float, eps: float) -> torch.Tensor:
    """``flat (N, C, L)`` normalised with its statistics inside ``w (N, 1, L)`` (the brain's share of each pixel;
    ``None``: the whole slice's statistics), in float32 (float64 stays) also when ``flat`` is bfloat16 (autocast)."""
    if flat.dtype != torch.float64:
        flat = flat.float()
    var, mean = torch.var_mean(flat, dim=2, unbiased=False, keepdim=True)
    if w is not None:
        w = w.to(flat.dtype)
        area = w.sum(dim=2, keepdim=True)
        weight = w / area.clamp_min(eps)
        # moments about the slice's mean (not E[x²] − E[x]², which cancels when a channel's mean is large);
        # sums of products, not bmm, which autocast would run in bfloat16
        centred = flat - mean
        shift = (centred * weight).sum(dim=2, keepdim=True)
        brain_mean = mean + shift
        brain_var = ((centred * centred * weight).sum(dim=2, keepdim=True) - shift * shift).clamp_min(0.0)
        trust = (area / min_weight).clamp(0.0, 1.0)
        mean = trust * brain_mean + (1.0 - trust) * mean
        var = trust * brain_var + (1.0 - trust) * var
    return (flat - mean) * torch.rsqrt(var + eps)


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    # automatic dynamic shapes: one recompile the first time a batch or feature size changes, then one kernel for all
    return torch.compile(_normalise)


class BrainInstanceNorm(nn.Module):
    """Instance normalisation whose statistics are taken inside the brain.

    Instance norm over the whole slice (``nn.InstanceNorm2d``) lets the background set the
    statistics: a peripheral slice, where the brain covers a few percent of the frame, is
    normalised mostly by background and comes out darker than a central slice of the same tissue
    (README, "Why the peripheral slices are dark"). Here each channel's mean and variance are
    weighted by the brain mask, resampled to the feature map by area averaging, so they describe
    the brain whatever its share of the frame. Where the brain is smaller than ``min_weight``
    pixels of the feature map (it vanishes at the bottleneck of the outermost slices), the
    statistics blend linearly into the whole-slice ones, so the output stays finite and continuous
    in the mask. No affine parameters: a bank entry alone decides a modality's style.

    Args:
        masked: ``False`` gives plain instance norm (the generators trained before version 0.3.0
            of the generator bundle); the mask is then ignored.
        min_weight: brain area, in pixels of the feature map, from which the brain's statistics
            are used unblended.
        eps: added to the variance, as in ``nn.InstanceNorm2d``.
        compile: run the computation as one ``torch.compile``'d function (:data:`COMPILE_MODES`;
            same output to float32 rounding). TorchScript runs it eager.

    Shapes: ``x (N, C, *S)``, ``brain (N, 1, *S0)`` in [0, 1] at any resolution → ``(N, C, *S)`` float32.

    Example::

        >>> norm = BrainInstanceNorm()
        >>> x, brain = torch.randn(2, 8, 16, 16), torch.ones(2, 1, 64, 64)
        >>> torch.allclose(norm(x, brain), nn.InstanceNorm2d(8)(x), atol=1e-5)
        True
    """

    def __init__(self, masked: bool = True, min_weight: float = 4.0, eps: float = 1e-5,
                 compile: str = "never") -> None:
        super().__init__()
        self.takes_brain = True  # forward(x, brain): the generator passes the mask to layers that have this
        self.masked = masked
        self.min_weight = min_weight
        self.eps = eps
        self.compile = check_compile(compile)

    def forward(self, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        if self.compile != "never" and not torch.jit.is_scripting():
            return self._forward_compiled(x, brain)
        return brain_instance_norm(x, brain, self.masked, self.min_weight, self.eps)

    @torch.jit.unused
    def _forward_compiled(self, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        if not compiled_norm_enabled(self.compile, x.device.type):
            return brain_instance_norm(x, brain, self.masked, self.min_weight, self.eps)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return _compiled()(flat, _brain_weights(x, brain, self.masked), self.min_weight, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"masked={self.masked}, min_weight={self.min_weight}, compile={self.compile!r}"
