"""bfloat16 compute (a preset's ``model.precision``): the networks' convolutions under autocast, everything a
loop sees (parameters, outputs, the gradient a site returns) float32, and the same function as float32
within bfloat16's rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalitybank import config, networks
from modalitybank.gan import GanLoss, site_step
from modalitybank.layers import BrainInstanceNorm
from modalitybank.networks import (
    ConditionalDiscriminator,
    ResnetGenerator,
    build_discriminator,
    build_generator,
    mask_channels,
)
from modalitybank.store import load_generator, read_info, save_generator


def _mask(n: int = 2, size: int = 32) -> torch.Tensor:
    label = torch.zeros(n, size, size, dtype=torch.long)
    label[:, 10:18, 12:20] = 2
    label[:, 12:15, 14:17] = 4
    brain = torch.zeros(n, size, size)
    brain[:, 3:-3, 4:-4] = 1
    return mask_channels(label, brain)


def _twins(**kwargs) -> tuple[ResnetGenerator, ResnetGenerator]:
    torch.manual_seed(0)
    full = ResnetGenerator(ngf=8, n_blocks=2, n_downsampling=3, **kwargs)
    half = ResnetGenerator(ngf=8, n_blocks=2, n_downsampling=3, precision="bfloat16", **kwargs)
    half.load_state_dict(full.state_dict())
    return full, half


def test_bfloat16_generator_is_the_float32_function_within_rounding() -> None:
    full, half = _twins()
    for g in (full, half):
        g.bank.add("flair")
        g.bank.freeze_base()
        g.bank.use("flair")
    with torch.no_grad():
        for p in half.bank.entry_parameters("flair"):
            p.mul_(1.1)
        for p in full.bank.entry_parameters("flair"):
            p.mul_(1.1)
    x = _mask()
    y_full, y_half = full(x), half(x)
    assert y_half.dtype == torch.float32 and y_half.shape == y_full.shape == (2, 1, 32, 32)
    err = (y_half - y_full).abs()
    assert 0 < err.max() < 0.1 and err.mean() < 0.02  # bfloat16 rounds (8-bit mantissa), nothing more

    # the entries' gradients (what the server's Adam follows) agree in direction
    y_full.sum().backward()
    y_half.sum().backward()
    g_full = torch.cat([p.grad.flatten() for p in full.bank.entry_parameters("flair")])
    g_half = torch.cat([p.grad.flatten() for p in half.bank.entry_parameters("flair")])
    assert g_half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g_full, g_half, dim=0) > 0.99


def test_bfloat16_runs_the_convolutions_in_bfloat16() -> None:
    _, half = _twins()
    seen: list[torch.dtype] = []
    conv = half.model[0]
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    half(_mask())
    handle.remove()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in half.parameters())


def test_site_step_of_a_bfloat16_discriminator_returns_a_float32_gradient_close_to_float32s() -> None:
    torch.manual_seed(0)
    d_full = ConditionalDiscriminator(channels=16, num_layers=2)
    d_half = ConditionalDiscriminator(channels=16, num_layers=2, precision="bfloat16")
    d_half.load_state_dict(d_full.state_dict())
    mask, real = _mask(), torch.rand(2, 1, 32, 32) * 2 - 1
    fake = torch.rand(2, 1, 32, 32) * 2 - 1
    grads = []
    for d in (d_full, d_half):
        opt = torch.optim.SGD(d.parameters(), lr=0.0)  # no update: both judge with the same weights
        grad, losses = site_step(d, opt, mask, real, fake, GanLoss())
        assert grad.dtype == torch.float32 and grad.shape == fake.shape
        assert all(isinstance(v, float) for v in losses.values())
        grads.append(grad)
    assert d_half(mask, real).dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99


def test_bfloat16_generator_scripts_folded_and_runs_float32() -> None:
    full, half = _twins()
    half.bank.add("t2")
    half.bank.freeze_base()
    scripted = torch.jit.script(half.bank.fold("t2"))
    y = scripted(_mask())
    assert y.dtype == torch.float32
    with torch.no_grad():
        half.bank.use("t2")
        assert (y - half(_mask())).abs().max() < 0.1


def test_brain_norm_takes_its_statistics_in_float32() -> None:
    x = torch.randn(2, 4, 16, 16).bfloat16()
    out = BrainInstanceNorm()(x, torch.ones(2, 1, 16, 16))
    assert out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(2, 4), atol=1e-5)


def test_precision_is_stored_and_a_store_without_it_loads_as_float32(tmp_path: Path) -> None:
    _, half = _twins(base_modality="t1c")
    save_generator(half, tmp_path / "half")
    assert read_info(tmp_path / "half")["architecture"]["precision"] == "bfloat16"
    assert load_generator(tmp_path / "half").precision == "bfloat16"
    info = json.loads((tmp_path / "half" / "generator.json").read_text())
    del info["architecture"]["precision"]
    (tmp_path / "half" / "generator.json").write_text(json.dumps(info))
    assert load_generator(tmp_path / "half").precision == "float32"


def test_presets_build_their_precision_and_unknown_ones_are_refused() -> None:
    small = config.preset("small")["model"]
    assert build_generator(small).precision == small.get("precision", "float32")
    assert build_discriminator(small).precision == small.get("precision", "float32")
    with pytest.raises(ValueError, match="precision"):
        ResnetGenerator(ngf=8, n_blocks=1, precision="float16")
    with pytest.raises(ValueError, match="precision"):
        ConditionalDiscriminator(channels=8, num_layers=1, precision="half")


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_generator_sees_the_phantom_at_its_own_in_plane_resolution(scale: str) -> None:
    """The slice size of ``small`` and ``paper`` is the phantom's in-plane grid (BraTS' 240 mm field of view at
    the preset's spacing), and divides by the generator's downsampling: no resizing between the images and the
    generator. At 64² on small's 120² slices the real images alone lost 2.7 Dice points (README)."""
    from modalitybank.data.anatomy import grid_shape

    p = config.preset(scale)
    size = p["slices"]["image_size"]
    assert grid_shape(p["data"]["spacing_mm"])[:2] == (size, size)
    assert size % 2 ** p["model"]["n_downsampling"] == 0


def test_mask_skip_head_sees_the_input_mask_at_full_resolution(tmp_path: Path) -> None:
    """With ``mask_skip`` the output depends on the mask through the head directly: a one-pixel change of the
    label map changes the output at that pixel even when the decoder's features are held fixed."""
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=3, mask_skip=True, base_modality="t1c")
    assert g.head.weight.shape[1] == 8 + 5 and "head.weight" in g.state_dict()
    x = _mask(1)
    y = x.clone()
    y[0, :, 5, 20] = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])  # one healthy pixel becomes edema
    features = g.model(x, x[:, -1:])
    with torch.no_grad():
        direct = torch.tanh(g.head(torch.cat([features, y], 1))) - torch.tanh(g.head(torch.cat([features, x], 1)))
    assert direct[0, 0, 5, 20].abs() > 0 and direct[0, 0, 5, 27:].abs().max() == 0  # 7x7 head: local only
    g.bank.add("flair")
    g.bank.freeze_base()
    assert "head" in g.bank.layers
    save_generator(g, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert loaded.mask_skip and read_info(tmp_path / "g")["architecture"]["mask_skip"] is True
    loaded.bank.use("flair")
    g.bank.use("flair")
    assert torch.equal(loaded(x), g(x))
    assert torch.allclose(torch.jit.script(g.bank.fold("flair"))(x), g(x), atol=1e-5)


def _entry_moves_edema(mask_skip_kernel: int) -> torch.Tensor:
    """How the output changes when the FLAIR entry raises the edema channel's constant ``B`` in the layer that
    takes the mask skip (``(H, W)``), for a 10×10 edema square at rows and columns 20–29."""
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=3, mask_skip=True, mask_skip_kernel=mask_skip_kernel,
                        base_modality="t1c")
    g.bank.add("flair")
    g.bank.freeze_base()
    g.bank.use("flair")
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[:, 20:30, 20:30] = 2
    brain = torch.zeros(1, 64, 64)
    brain[:, 4:-4, 4:-4] = 1
    x = mask_channels(label, brain)
    layer, edema = (g.head, 8 + 2) if mask_skip_kernel == 7 else (g.skip, 2)
    with torch.no_grad():
        before = torch.atanh(g(x).clamp(-0.999, 0.999))
        layer.entries["flair"].beta[0, edema] += 0.01
        after = torch.atanh(g(x).clamp(-0.999, 0.999))
    return (after - before)[0, 0]


def test_a_1x1_mask_skip_lets_a_bank_entry_draw_a_label_with_a_sharp_edge() -> None:
    """An entry's ``B`` is a constant over its kernel: in the 7×7 head (0.4.x) it adds a 7×7 box filter of the
    label, a ramp 3 pixels beyond its edge; on the 1×1 skip the change is the label's own pixels, evenly."""
    head = _entry_moves_edema(7)
    assert head[20:30, 20:30].abs().min() > 0 and head[17:20, 20:30].abs().min() > 0  # spills outside
    assert head[25, 25] > 3 * head[25, 18] > 0  # and ramps: 49 edema pixels in the window, against 14
    skip = _entry_moves_edema(1)
    inside = skip[20:30, 20:30]
    assert torch.allclose(inside, torch.full_like(inside, 0.01), atol=1e-4)
    outside = skip.clone()
    outside[20:30, 20:30] = 0
    assert outside.abs().max() < 1e-5


def test_a_1x1_mask_skip_is_stored_folded_and_scripted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=3, mask_skip=True, mask_skip_kernel=1, base_modality="t1c")
    assert g.skip.weight.shape == (1, 5, 1, 1) and g.head.weight.shape[1] == 8
    g.bank.add("flair")
    g.bank.freeze_base()
    assert "skip" in g.bank.layers
    with torch.no_grad():
        g.skip.entries["flair"].beta.add_(0.3)
    save_generator(g, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert read_info(tmp_path / "g")["architecture"]["mask_skip_kernel"] == 1
    x = _mask(2)
    g.bank.use("flair")
    loaded.bank.use("flair")
    assert torch.equal(loaded(x), g(x))
    assert torch.allclose(torch.jit.script(g.bank.fold("flair"))(x), g(x), atol=1e-5)


def test_a_store_without_mask_skip_kernel_loads_the_0_4_layout(tmp_path: Path) -> None:
    g = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=3, mask_skip=True, base_modality="t1c")
    save_generator(g, tmp_path / "g")
    info = json.loads((tmp_path / "g" / "generator.json").read_text())
    del info["architecture"]["mask_skip_kernel"]
    (tmp_path / "g" / "generator.json").write_text(json.dumps(info))
    loaded = load_generator(tmp_path / "g")
    assert loaded.skip_in_head and torch.equal(loaded(_mask(1)), g(_mask(1)))


def test_a_store_without_mask_skip_loads_without_it(tmp_path: Path) -> None:
    g = ResnetGenerator(ngf=8, n_blocks=1, base_modality="t1c")
    save_generator(g, tmp_path / "g")
    info = json.loads((tmp_path / "g" / "generator.json").read_text())
    del info["architecture"]["mask_skip"]
    (tmp_path / "g" / "generator.json").write_text(json.dumps(info))
    loaded = load_generator(tmp_path / "g")
    assert not loaded.mask_skip and torch.equal(loaded(_mask(1)), g(_mask(1)))


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bfloat16_only_where_the_hardware_has_it(monkeypatch, native: bool) -> None:
    """Emulated bfloat16 (a CPU without AVX512-BF16 or AMX) is ~10x slower than float32: "auto" then runs float32."""
    monkeypatch.setattr(networks, "native_bfloat16", lambda device_type: native)
    full, _ = _twins()
    auto = ResnetGenerator(ngf=8, n_blocks=2, n_downsampling=3, precision="auto")
    auto.load_state_dict(full.state_dict())
    seen: list[torch.dtype] = []
    handle = auto.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = _mask()
    with torch.no_grad():
        y_auto, y_full = auto(x), full(x)
    handle.remove()
    assert seen == [torch.bfloat16 if native else torch.float32] and y_auto.dtype == torch.float32
    if native:
        assert 0 < (y_auto - y_full).abs().max() < 0.1
    else:
        assert torch.equal(y_auto, y_full)
    assert networks.effective_precision("auto") == ("bfloat16" if native else "float32")
    assert networks.effective_precision("bfloat16") == "bfloat16"  # asked for by name, it is not second-guessed
