"""The networks: the mask→image generator, the site discriminator, the segmentation network.

* :class:`ResnetGenerator` — pix2pix-style ResNet encoder–decoder (the AsynDGAN/ModalityBank
  lineage). With ``modulated=True`` every convolution and transposed convolution is an mAdaFM
  layer, so the network carries a :class:`~modalitybank.bank.ModalityBank`; with
  ``output_modalities`` and ``modulated=False`` it is the AsynDGAN baseline: one plain generator
  with one output channel per modality.
* :class:`ConditionalDiscriminator` — MONAI's ``PatchDiscriminator`` on (mask, image).
* :func:`segmentation_network` — MONAI's ``BasicUNet``.

The generator's input is the tumour label map one-hot over the BraTS labels (0, 1, 2, 4) plus a
brain-mask channel (:func:`mask_channels`), so it knows where the brain is.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets import BasicUNet, PatchDiscriminator
from torch import nn

from modalitybank.bank import ModalityBank
from modalitybank.config import BRATS_LABELS, one_of
from modalitybank.layers import MAdaFMConv
from modalitybank.norm import BrainInstanceNorm, check_compile

__all__ = [
    "MASK_CHANNELS",
    "PRECISIONS",
    "ConditionalDiscriminator",
    "ResnetGenerator",
    "build_discriminator",
    "build_generator",
    "effective_precision",
    "mask_channels",
    "native_bfloat16",
    "segmentation_network",
]

#: The generator's normalisations (:class:`ResnetGenerator` ``norm``).
NORMS = ("brain", "instance")

#: Compute precisions of the networks' convolutions (``precision`` of :class:`ResnetGenerator` and
#: :class:`ConditionalDiscriminator`): ``"bfloat16"`` runs them under ``torch.autocast`` (parameters,
#: norms, losses and outputs stay float32), about 1.5x faster on CPUs with bfloat16 instructions
#: (AVX512-BF16, AMX) and on GPUs, but about 10x *slower* on a CPU without them, where it is emulated
#: (one 32-channel 3×3 convolution at 120², batch 8, forward and backward: 0.94 s against 0.09 s in
#: float32 on an AVX2-only EPYC). ``"auto"``: bfloat16 where the device computes it natively
#: (:func:`native_bfloat16`), float32 elsewhere.
PRECISIONS = ("float32", "bfloat16", "auto")


def _check_precision(precision: str) -> str:
    return one_of("precision", precision, PRECISIONS)


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"``, ``"cuda"``) has bfloat16 arithmetic in hardware (CPU: AVX512-BF16 or AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def effective_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision the convolutions run in on ``device_type``: ``"auto"`` resolved, the others as they are."""
    if _check_precision(precision) == "auto":
        return "bfloat16" if native_bfloat16(device_type) else "float32"
    return precision


def _autocast(x: torch.Tensor, precision: str) -> torch.autocast:
    """The autocast context of ``precision`` for the device of ``x`` (disabled where it means float32)."""
    enabled = effective_precision(precision, x.device.type) == "bfloat16"
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled)

#: Generator input channels: one-hot BraTS labels (0, 1, 2, 4) and the brain mask.
MASK_CHANNELS = len(BRATS_LABELS) + 1


def mask_channels(label: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Generator input from a label map and a brain mask.

    Args:
        label: ``(N, *spatial)`` integer BraTS labels in {0, 1, 2, 4}.
        brain: ``(N, *spatial)`` brain mask in {0, 1}.

    Returns:
        ``(N, 5, *spatial)`` float: one-hot labels 0, 1, 2, 4 (label 0 only inside the brain)
        and the brain mask.
    """
    label = label.long()
    brain_f = (brain > 0).float()
    planes = [((label == 0).float() * brain_f)] + [(label == v).float() for v in BRATS_LABELS[1:]] + [brain_f]
    return torch.stack(planes, dim=1)


def _conv(modulated: bool, spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1,
          padding: int = 0, transposed: bool = False, padding_mode: str = "zeros", bias: bool = True) -> nn.Module:
    if modulated:
        return MAdaFMConv(spatial_dims, cin, cout, kernel, stride=stride, padding=padding, transposed=transposed,
                          output_padding=1 if transposed else 0, padding_mode=padding_mode, bias=bias)
    if transposed:
        return Conv[Conv.CONVTRANS, spatial_dims](cin, cout, kernel, stride=stride, padding=padding, output_padding=1,
                                                  bias=bias)
    return Conv[Conv.CONV, spatial_dims](cin, cout, kernel, stride=stride, padding=padding, padding_mode=padding_mode,
                                         bias=bias)


class _BrainSequential(nn.ModuleList):
    """Layers run in sequence; those with a ``takes_brain`` attribute (the norms, the residual blocks)
    also get the brain mask. A ``ModuleList``, so parameter names are those of an ``nn.Sequential``."""

    def forward(self, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        for layer in self:
            # hasattr, not isinstance: TorchScript resolves it per layer even when the same class appears
            # under several compiled types (masked or not, other widths)
            if hasattr(layer, "takes_brain"):
                x = layer(x, brain)
            else:
                x = layer(x)
        return x


class _ResidualBlock(nn.Module):
    """conv → norm → ReLU → conv → norm, added to the input; the norms see the brain mask."""

    def __init__(self, modulated: bool, spatial_dims: int, channels: int, masked_norm: bool,
                 compile: str = "never") -> None:
        super().__init__()
        self.takes_brain = True  # forward(x, brain): see _BrainSequential
        # indices as in the nn.Sequential of the generators before 0.3.0, so saved bank entries keep their names
        self.body = _BrainSequential([
            _conv(modulated, spatial_dims, channels, channels, 3, padding=1, padding_mode="reflect"),
            BrainInstanceNorm(masked_norm, compile=compile), nn.ReLU(inplace=True),
            _conv(modulated, spatial_dims, channels, channels, 3, padding=1, padding_mode="reflect"),
            BrainInstanceNorm(masked_norm, compile=compile),
        ])

    def forward(self, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        return x + self.body(x, brain)


class ResnetGenerator(nn.Module):
    """pix2pix ResNet generator: 7×7 stem, ``n_downsampling`` strided convs, ``n_blocks`` residual
    blocks, as many transposed convs, 7×7 head, ``tanh``. Instance norm without affine
    parameters, so that a bank entry alone decides a modality's style, with its statistics taken
    inside the brain (:class:`~modalitybank.layers.BrainInstanceNorm`; the last input channel is
    the brain mask), so that a slice's intensities do not depend on how much of the frame the brain
    covers.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes).
        in_channels: mask channels (:data:`MASK_CHANNELS`).
        out_channels: 1 for a bank generator; one per modality for the AsynDGAN baseline.
        ngf: channels after the stem; doubled at each downsampling.
        n_blocks: residual blocks at the bottleneck.
        n_downsampling: stride-2 stages (input size must be divisible by ``2**n_downsampling``).
        modulated: every conv an mAdaFM layer (a bank generator) or plain convolutions.
        output_modalities: the modality of each output channel, for a multi-channel generator.
        base_modality: the modality the plain base makes (the one it was pre-trained on); it is
            generated without a bank entry unless the bank holds an entry of that name.
        norm: ``"brain"`` (statistics inside the brain mask) or ``"instance"`` (over the whole
            slice: the generators saved before the ``norm`` setting existed).
        precision: ``"float32"``, ``"bfloat16"`` (the convolutions run in bfloat16 under autocast;
            parameters and the output stay float32) or ``"auto"`` (bfloat16 where the device has it in
            hardware, else float32): :data:`PRECISIONS`. TorchScript runs float32.
        mask_skip: the input mask channels reach the output directly (how: ``mask_skip_kernel``), so the
            label map's edges reach the output at full resolution instead of through the bottleneck
            (without it a tumour's edge is drawn as a ramp several pixels wide, and a segmentation
            network trained on such images draws real edges too tight). The head is then ``head``, not
            the last layers of ``model``.
        mask_skip_kernel: the kernel of the mask skip's convolution. ``7`` (generators 0.4.x): the mask
            channels join the decoder's features in the 7×7 head. Any other size: a separate convolution
            ``skip`` of the mask channels, without bias, added to the head's output before ``tanh``.
            Why ``1``: an mAdaFM entry rescales a frozen kernel's normalised pattern and adds a constant over
            the kernel (``B``), so on a 7×7 kernel the one thing an entry can add to a label's contribution
            is a 7×7 box filter — a ramp 7 pixels wide at every edge of a label the pre-training modality
            hardly showed (edema in T1c). On a 1×1 kernel ``B`` is the whole weight: each entry gives each
            label its own intensity offset, with the label's edge as sharp as the mask's.
        compile: the brain-masked norms as one ``torch.compile``'d kernel (:data:`~modalitybank.norm.COMPILE_MODES`:
            ``"never"``, ``"always"``, ``"auto"`` where the machine can build kernels); same output to float32
            rounding, about 30 % less time per bank iteration on a 2-core CPU. A setting of how it runs, not of
            what it computes, saved like ``precision``; TorchScript runs eager.

    Shapes: ``(N, in_channels, *spatial)`` → ``(N, out_channels, *spatial)`` in [-1, 1].

    Example::

        >>> g = ResnetGenerator(ngf=16, n_blocks=2)
        >>> g.bank.add("flair"); g.bank.freeze_base(); g.bank.use("flair")
        >>> g(torch.zeros(2, 5, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    __jit_unused_properties__ = ["bank"]

    def __init__(self, spatial_dims: int = 2, in_channels: int = MASK_CHANNELS, out_channels: int = 1, ngf: int = 32,
                 n_blocks: int = 4, n_downsampling: int = 2, modulated: bool = True,
                 output_modalities: Sequence[str] | None = None, base_modality: str | None = None,
                 norm: str = "brain", precision: str = "float32", mask_skip: bool = False,
                 mask_skip_kernel: int = 7, compile: str = "never") -> None:
        super().__init__()
        one_of("norm", norm, NORMS)
        if output_modalities is not None and len(output_modalities) != out_channels:
            raise ValueError(f"output_modalities {list(output_modalities)} must name all {out_channels} output channels")
        self.config: dict[str, Any] = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels, "ngf": ngf,
            "n_blocks": n_blocks, "n_downsampling": n_downsampling, "modulated": modulated,
            "output_modalities": list(output_modalities) if output_modalities is not None else None,
            "base_modality": base_modality, "norm": norm, "precision": _check_precision(precision),
            "mask_skip": bool(mask_skip), "mask_skip_kernel": int(mask_skip_kernel), "compile": check_compile(compile),
        }
        self.precision = precision
        masked = norm == "brain"
        layers: list[nn.Module] = [
            _conv(modulated, spatial_dims, in_channels, ngf, 7, padding=3, padding_mode="reflect"),
            BrainInstanceNorm(masked, compile=compile), nn.ReLU(inplace=True),
        ]
        channels = ngf
        for _ in range(n_downsampling):
            layers += [_conv(modulated, spatial_dims, channels, channels * 2, 3, stride=2, padding=1),
                       BrainInstanceNorm(masked, compile=compile), nn.ReLU(inplace=True)]
            channels *= 2
        layers += [_ResidualBlock(modulated, spatial_dims, channels, masked, compile) for _ in range(n_blocks)]
        for _ in range(n_downsampling):
            layers += [_conv(modulated, spatial_dims, channels, channels // 2, 3, stride=2, padding=1, transposed=True),
                       BrainInstanceNorm(masked, compile=compile), nn.ReLU(inplace=True)]
            channels //= 2
        in_head = mask_skip and mask_skip_kernel == 7  # the 0.4.x layout
        head = _conv(modulated, spatial_dims, channels + (in_channels if in_head else 0), out_channels, 7, padding=3,
                     padding_mode="reflect")
        if not mask_skip:
            layers += [head, nn.Tanh()]
        self.model = _BrainSequential(layers)  # keys as the nn.Sequential of earlier versions
        self.mask_skip = bool(mask_skip)
        self.skip_in_head = bool(in_head)
        self.head = head if mask_skip else nn.Identity()
        self.skip = _conv(modulated, spatial_dims, in_channels, out_channels, mask_skip_kernel,
                          padding=mask_skip_kernel // 2, padding_mode="reflect", bias=False) \
            if mask_skip and not in_head else nn.Identity()
        self._bank = ModalityBank(self) if modulated else None

    @property
    def bank(self) -> ModalityBank:
        """The modality bank (only for ``modulated=True``)."""
        if self._bank is None:
            raise AttributeError("a plain generator (modulated=False) has no modality bank")
        return self._bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision != "float32" and not torch.jit.is_scripting():
            return self._forward_autocast(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x, x[:, -1:])  # the last input channel is the brain mask
        if self.skip_in_head:
            out = torch.tanh(self.head(torch.cat([out, x.to(out.dtype)], dim=1)))
        elif self.mask_skip:
            out = torch.tanh(self.head(out) + self.skip(x.to(out.dtype)))
        return out

    @torch.jit.unused
    def _forward_autocast(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x, self.precision):
            return self._run(x).float()

    def generate(self, mask: torch.Tensor, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        """Synthesise ``modalities`` from mask channels: ``{modality: (N, 1, *spatial)}``.

        A bank generator runs once per modality with that modality's entry (the plain base for
        its ``base_modality``); a multi-channel (AsynDGAN) generator runs once and its channels
        are split.
        """
        names = self.config["output_modalities"]
        if names is not None:
            missing = [m for m in modalities if m not in names]
            if missing:
                raise KeyError(f"this generator has no output channel for {missing}; it makes {names}")
            out = self(mask)
            return {m: out[:, names.index(m)].unsqueeze(1) for m in modalities}
        fakes = {}
        for m in modalities:
            use_base = m == self.config["base_modality"] and m not in self.bank.modalities
            with self.bank.using(None if use_base else m):
                fakes[m] = self(mask)
        return fakes

    def generate_for_sites(self, masks: Mapping[str, torch.Tensor],
                           modalities: Mapping[str, Sequence[str]]) -> dict[str, dict[str, torch.Tensor]]:
        """Every site's fakes, one pass per modality over the masks of all sites that hold it.

        Args:
            masks: ``{site: (N_site, 5, *spatial)}`` mask channels.
            modalities: ``{site: modalities it holds}``.

        Returns ``{site: {modality: (N_site, 1, *spatial)}}``, views of the batched outputs (so the
        sites' gradients backpropagate through one graph). The norm layers are per-sample (instance
        norm), so batching changes no value.
        """
        out: dict[str, dict[str, torch.Tensor]] = {site: {} for site in masks}
        for m in dict.fromkeys(m for mods in modalities.values() for m in mods):
            holders = [site for site in masks if m in modalities[site]]
            fake = self.generate(torch.cat([masks[site] for site in holders]), [m])[m]
            for site, part in zip(holders, fake.split([masks[site].shape[0] for site in holders]), strict=True):
                out[site][m] = part
        return out


def build_generator(model: dict[str, Any], spatial_dims: int = 2, output_modalities: Sequence[str] | None = None,
                    base_modality: str | None = None) -> ResnetGenerator:
    """A generator from a preset's ``model`` section; ``output_modalities`` makes the AsynDGAN baseline."""
    multi = output_modalities is not None
    return ResnetGenerator(spatial_dims=spatial_dims, out_channels=len(output_modalities) if multi else 1,
                           ngf=model["ngf"], n_blocks=model["n_blocks"], n_downsampling=model["n_downsampling"],
                           modulated=not multi, output_modalities=output_modalities, base_modality=base_modality,
                           norm=model["norm"], precision=model.get("precision", "float32"),
                           mask_skip=model.get("mask_skip", False), mask_skip_kernel=model.get("mask_skip_kernel", 7),
                           compile=model.get("compile", "never"))


class ConditionalDiscriminator(nn.Module):
    """Conditional PatchGAN: MONAI's ``PatchDiscriminator`` on the mask channels and the image.

    Args:
        spatial_dims: 2 or 3.
        mask_channels: channels of the condition (:data:`MASK_CHANNELS`).
        image_channels: channels of the image judged (1: one modality).
        channels: width of the first layer (pix2pix's ``ndf``).
        num_layers: strided layers (pix2pix's ``n_layers_D``).
        precision: ``"float32"``, ``"bfloat16"`` (convolutions under autocast; float32 logits) or ``"auto"``.

    Shapes: ``mask (N, mask_channels, *S)``, ``image (N, image_channels, *S)`` →
    patch logits ``(N, 1, *S')``, float32.
    """

    def __init__(self, spatial_dims: int = 2, mask_channels: int = MASK_CHANNELS, image_channels: int = 1,
                 channels: int = 64, num_layers: int = 3, precision: str = "float32") -> None:
        super().__init__()
        self.net = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels,
                                      in_channels=mask_channels + image_channels, out_channels=1,
                                      num_layers_d=num_layers, norm="INSTANCE")
        self.precision = _check_precision(precision)

    def forward(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if self.precision != "float32" and not torch.jit.is_scripting():
            return self._forward_autocast(mask, image)
        return self.net(torch.cat([mask, image], dim=1))[-1]

    @torch.jit.unused
    def _forward_autocast(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        with _autocast(image, self.precision):
            return self.net(torch.cat([mask, image], dim=1))[-1].float()

    @torch.jit.unused
    def features(self, mask: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output, the patch logits last (float32): what feature matching compares
        (:attr:`modalitybank.gan.GanLoss.lambda_fm`)."""
        with _autocast(image, self.precision):
            return [f.float() for f in self.net(torch.cat([mask, image], dim=1))]


def build_discriminator(model: dict[str, Any], spatial_dims: int = 2) -> ConditionalDiscriminator:
    """A site discriminator from a preset's ``model`` section (``ndf``, ``n_layers_d``, optional ``precision``)."""
    return ConditionalDiscriminator(spatial_dims=spatial_dims, channels=model["ndf"], num_layers=model["n_layers_d"],
                                    precision=model.get("precision", "float32"))


def segmentation_network(in_channels: int, out_channels: int = 2, spatial_dims: int = 2,
                         features: Sequence[int] = (16, 16, 32, 64, 128, 16)) -> nn.Module:
    """MONAI ``BasicUNet`` for whole-tumour segmentation (background / tumour logits)."""
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=features)
