"""mAdaFM: convolutions whose frozen kernel is re-styled per modality (paper Eq. 2).

For a convolution with weight ``W`` and bias ``b_conv``, modality ``i`` uses

    Ŵ_i = Γ_i ⊙ (W − M) / S + B_i,        b̂_i = b_i + b_conv

where ``M`` and ``S`` are the mean and standard deviation of ``W`` over its spatial
dimensions, one value per (first, second) weight-channel pair, and ``Γ_i, B_i`` (same shape as
``M``) and ``b_i`` (one per output channel) are the modality's *bank entry*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from modalitybank.norm import BrainInstanceNorm

__all__ = ["BankEntry", "BrainInstanceNorm", "MAdaFMConv", "weight_statistics"]

#: Below this a kernel's spatial standard deviation counts as zero (1×1 kernels, constant kernels).
_STD_EPS = 1e-8


def weight_statistics(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``M`` and standard deviation ``S`` of a kernel over its spatial dimensions.

    Args:
        weight: kernel of shape ``(A, B, *spatial)`` (``A, B`` = out/in channels for a
            convolution, in/out for a transposed one).

    Returns:
        ``M, S`` of shape ``(A, B, 1, ..., 1)`` (broadcastable against ``weight``). Where a
        kernel has no spatial spread (a 1×1 kernel) ``S`` is 1, so that ``(W - M) / S = 0``
        and the entry's ``B`` alone carries the weight.
    """
    dims = tuple(range(2, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    if weight[0, 0].numel() > 1:
        std = weight.std(dim=dims, keepdim=True, unbiased=False)
    else:
        std = torch.zeros_like(mean)
    std = torch.where(std > _STD_EPS, std, torch.ones_like(std))
    return mean, std


class BankEntry(nn.Module):
    """One modality's modulation parameters for one layer: ``Γ, B`` of shape ``(A, B)`` and ``b`` of ``(C_out,)``."""

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(gamma.detach().clone())
        self.beta = nn.Parameter(beta.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None


class MAdaFMConv(nn.Module):
    """Convolution (or transposed convolution) with a bank of per-modality mAdaFM entries.

    With no active entry it is an ordinary convolution with trainable ``weight``/``bias``
    (pre-training). :meth:`add_entry` creates an entry initialised to ``Γ = S, B = M, b = 0``,
    which reproduces the current kernel exactly; :meth:`freeze_base` then fixes ``W, b_conv``
    so that only entries learn. Setting :attr:`active` selects the entry used by ``forward``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size, stride, padding, dilation, groups, bias: as for ``torch.nn.ConvNd``.
        transposed: a transposed convolution (``ConvTransposeNd``) instead.
        output_padding: for transposed convolutions.
        padding_mode: ``"zeros"`` or ``"reflect"``/``"replicate"``/``"circular"`` (plain convolutions only).

    Example::

        >>> conv = MAdaFMConv(2, 4, 8, kernel_size=3, padding=1)
        >>> x = torch.randn(1, 4, 16, 16)
        >>> y0 = conv(x)
        >>> conv.add_entry("flair"); conv.freeze_base(); conv.active = "flair"
        >>> torch.allclose(conv(x), y0, atol=1e-5)
        True
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        transposed: bool = False,
        output_padding: int | Sequence[int] = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if transposed and padding_mode != "zeros":
            raise ValueError("transposed mAdaFM convolutions support padding_mode='zeros' only")
        conv_type = Conv[Conv.CONVTRANS if transposed else Conv.CONV, spatial_dims]
        kwargs = {"output_padding": output_padding} if transposed else {"padding_mode": padding_mode}
        # The plain layer is built only to get PyTorch's initialisation and normalised arguments.
        ref = conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                        dilation=dilation, groups=groups, bias=bias, **kwargs)
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.transposed = transposed
        self.stride, self.padding, self.dilation = ref.stride, ref.padding, ref.dilation
        self.groups = groups
        self.output_padding = ref.output_padding if transposed else None
        self.padding_mode = padding_mode
        self._reversed_padding = ref._reversed_padding_repeated_twice
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.entries = nn.ModuleDict()
        self.active: str | None = None
        self._normalized: tuple[tuple[int, int], torch.Tensor] | None = None  # (W − M)/S of a frozen base

    # -- bank -------------------------------------------------------------------------------
    def add_entry(self, name: str) -> BankEntry:
        """Create entry ``name`` at the identity modulation (Γ = S, B = M, b = 0)."""
        if name in self.entries:
            raise KeyError(f"bank entry {name!r} already exists")
        mean, std = weight_statistics(self.weight.detach())
        zero_bias = torch.zeros(self.out_channels) if self.bias is not None else None
        entry = BankEntry(std.flatten(2).squeeze(-1), mean.flatten(2).squeeze(-1), zero_bias)
        self.entries[name] = entry.to(self.weight.device)
        return self.entries[name]

    def freeze_base(self) -> None:
        """Fix ``W`` and ``b_conv``; only bank entries keep learning."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._normalized = None

    @property
    def base_frozen(self) -> bool:
        return not self.weight.requires_grad

    def normalized_weight(self) -> torch.Tensor:
        """``(W − M)/S``; computed once while the base is frozen, every call otherwise."""
        key = (self.weight.data_ptr(), self.weight._version)  # changes when the base is loaded or moved
        if self.base_frozen and self._normalized is not None and self._normalized[0] == key:
            return self._normalized[1]
        mean, std = weight_statistics(self.weight)
        normalized = (self.weight - mean) / std
        self._normalized = (key, normalized.detach()) if self.base_frozen else None
        return normalized

    def modulated(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel and bias that entry ``name`` (default: the active one) makes of the base."""
        name = self.active if name is None else name
        if name is None:
            return self.weight, self.bias
        entry: BankEntry = self.entries[name]  # type: ignore[assignment]
        expand = (...,) + (None,) * self.spatial_dims
        weight = entry.gamma[expand] * self.normalized_weight() + entry.beta[expand]
        if self.bias is None:
            bias = entry.bias
        elif entry.bias is None:
            bias = self.bias
        else:
            bias = entry.bias + self.bias
        return weight, bias

    # -- forward ----------------------------------------------------------------------------
    def _apply_kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.spatial_dims - 1]
            return fn(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return fn(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, in_channels, *spatial)`` → ``(N, out_channels, *spatial')``."""
        weight, bias = self.modulated()
        return self._apply_kernel(x, weight, bias)

    def fold(self, name: str | None = None) -> nn.Module:
        """A plain ``torch.nn.ConvNd``/``ConvTransposeNd`` computing what entry ``name`` computes.

        For fast inference and TorchScript: the modulation is evaluated once.
        """
        weight, bias = self.modulated(name)
        conv_type = Conv[Conv.CONVTRANS if self.transposed else Conv.CONV, self.spatial_dims]
        kwargs = {"output_padding": self.output_padding} if self.transposed else {"padding_mode": self.padding_mode}
        plain = conv_type(self.in_channels, self.out_channels, tuple(self.weight.shape[2:]), stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                          bias=bias is not None, **kwargs)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        return plain.to(self.weight.device)

    def extra_repr(self) -> str:
        kind = "transposed " if self.transposed else ""
        return (f"{self.spatial_dims}D {kind}{self.in_channels}->{self.out_channels}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, entries={list(self.entries)}, active={self.active!r}")
