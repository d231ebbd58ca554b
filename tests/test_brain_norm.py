"""The generator's brain-masked instance norm: intensities that do not depend on how much of the
frame the brain covers (README, "Why the peripheral slices are dark")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from modalitybank.layers import BrainInstanceNorm
from modalitybank.networks import ResnetGenerator
from modalitybank.store import load_generator, read_info, save_generator


def _brain_in_frame(content: torch.Tensor, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``content`` (N, C, s, s) placed in the corner of a ``frame``² map of background (a constant
    unlike the brain), with its brain mask."""
    n, c, s, _ = content.shape
    x = torch.full((n, c, frame, frame), 3.0)
    x[..., :s, :s] = content
    brain = torch.zeros(n, 1, frame, frame)
    brain[..., :s, :s] = 1.0
    return x, brain


def test_whole_frame_brain_and_unmasked_mode_are_instance_norm() -> None:
    x = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = nn.InstanceNorm2d(6)(x)
    assert torch.allclose(BrainInstanceNorm()(x, torch.ones(2, 1, 64, 64)), reference, atol=1e-5)
    partial = torch.zeros(2, 1, 16, 16)
    partial[..., 4:9, 4:9] = 1
    assert torch.allclose(BrainInstanceNorm(masked=False)(x, partial), reference, atol=1e-5)
    assert not torch.allclose(BrainInstanceNorm()(x, partial), reference, atol=1e-2)


def test_brain_statistics_do_not_depend_on_the_brain_share_of_the_frame() -> None:
    content = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    small_frame, small_brain = _brain_in_frame(content, 16)  # brain: 25 % of the frame
    large_frame, large_brain = _brain_in_frame(content, 32)  # brain: 6 % of the frame
    masked = BrainInstanceNorm()
    a = masked(small_frame, small_brain)[..., :8, :8]
    b = masked(large_frame, large_brain)[..., :8, :8]
    assert torch.allclose(a, b, atol=1e-4)
    whole = BrainInstanceNorm(masked=False)
    assert (whole(small_frame, small_brain)[..., :8, :8] - whole(large_frame, large_brain)[..., :8, :8]).abs().max() > 0.1


@pytest.mark.parametrize("pixels", [0, 1, 3])
def test_vanishing_brain_blends_into_whole_slice_statistics(pixels: int) -> None:
    """Below ``min_weight`` pixels the statistics blend into the whole slice's: finite, and exactly
    instance norm when there is no brain at all."""
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    brain = torch.zeros(1, 1, 8, 8)
    brain.view(-1)[:pixels] = 1.0
    out = BrainInstanceNorm(min_weight=4.0)(x, brain)
    assert torch.isfinite(out).all()
    if pixels == 0:
        assert torch.allclose(out, nn.InstanceNorm2d(3)(x), atol=1e-5)


def test_generator_on_a_slice_whose_brain_vanishes_at_the_bottleneck_is_finite_and_scripts() -> None:
    g = ResnetGenerator(ngf=8, n_blocks=2)
    g.bank.add("t2")
    g.bank.freeze_base()
    x = torch.zeros(3, 5, 64, 64)
    x[0, 4, 10:50, 12:52] = 1  # a central slice
    x[1, 4, 30:32, 30:33] = 1  # 6 pixels: under a pixel at the 16² bottleneck
    x[:, 0] = x[:, 4]
    with torch.no_grad(), g.bank.using("t2"):
        eager = g(x)
    assert torch.isfinite(eager).all()
    scripted = torch.jit.script(g.bank.fold("t2"))
    assert (scripted(x) - eager).abs().max().item() < 1e-5


def test_norm_is_saved_and_a_store_without_it_loads_as_instance_norm(tmp_path: Path) -> None:
    g = ResnetGenerator(ngf=8, n_blocks=2, base_modality="t1c")
    g.bank.add("t2")
    save_generator(g, tmp_path / "new")
    assert read_info(tmp_path / "new")["architecture"]["norm"] == "brain"
    assert load_generator(tmp_path / "new").config["norm"] == "brain"
    legacy = json.loads((tmp_path / "new" / "generator.json").read_text())
    del legacy["architecture"]["norm"]  # as written before the setting existed
    (tmp_path / "new" / "generator.json").write_text(json.dumps(legacy))
    assert load_generator(tmp_path / "new").config["norm"] == "instance"
    with pytest.raises(ValueError, match="norm"):
        ResnetGenerator(ngf=8, norm="batch")
