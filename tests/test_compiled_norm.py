"""The brain-masked norm as one compiled kernel (``compile`` setting): the same function and gradient as
the eager code, eager under TorchScript and where no kernel can be built, saved with the generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalitybank import config, norm
from modalitybank.networks import ResnetGenerator, build_generator
from modalitybank.norm import BrainInstanceNorm, brain_instance_norm, compiled_norm_enabled
from modalitybank.store import load_generator, save_generator, with_run_settings

needs_compiler = pytest.mark.skipif(not norm.compile_available("cpu"),
                                    reason="torch.compile cannot build CPU kernels here (no C++ compiler)")


def _slices(n: int = 3, c: int = 4, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps with a large channel mean, and brain masks: a central brain, a brain of a few pixels
    (statistics blended into the whole slice's), no brain at all."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=gen) * 2 + 7
    brain = torch.zeros(n, 1, 4 * size, 4 * size)
    brain[0, :, 10:80, 12:70] = 1
    brain[1, :, 40:45, 40:44] = 1  # 20 pixels of the mask: about one pixel of the feature map
    return x, brain


@needs_compiler
def test_compiled_norm_is_the_eager_function_and_gradient() -> None:
    x, brain = _slices()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("never", "always"):
        leaf = x.clone().requires_grad_(True)
        out = BrainInstanceNorm(compile=mode)(leaf, brain)
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        results[mode] = out.detach(), grad
    (eager, eager_grad), (fused, fused_grad) = results["never"], results["always"]
    assert (fused - eager).abs().max().item() < 1e-4
    assert (fused_grad - eager_grad).abs().max().item() < 1e-4
    assert eager_grad.abs().max().item() > 0.1  # a gradient that says something
    # and the eager gradient is the function's own (float64 finite differences)
    small = x[:, :2, :6, :6].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: brain_instance_norm(t, brain.double()), (small,))


@needs_compiler
def test_a_compiled_generator_trains_like_the_eager_one_and_scripts_eager() -> None:
    torch.manual_seed(0)
    eager = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=2)
    fused = ResnetGenerator(ngf=8, n_blocks=1, n_downsampling=2, compile="always")
    fused.load_state_dict(eager.state_dict())
    x = torch.zeros(2, 5, 32, 32)
    x[:, 4, 4:28, 6:26] = 1
    x[:, 0] = x[:, 4]
    x[0, 2, 10:16, 10:16], x[0, 0, 10:16, 10:16] = 1, 0
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    grads = {}
    for name, g in (("eager", eager), ("fused", fused)):
        g.zero_grad()
        (g(x) - target).abs().mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
    assert torch.allclose(grads["fused"], grads["eager"], atol=1e-5, rtol=1e-3)
    assert grads["eager"].abs().max().item() > 0
    scripted = torch.jit.script(fused.bank.fold(None))  # the compiled branch is left out of TorchScript
    with torch.no_grad():
        assert (scripted(x) - eager(x)).abs().max().item() < 1e-5


def test_auto_runs_eager_where_no_kernel_can_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm, "compile_available", lambda device_type: False)

    def no_compiling() -> None:
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(norm, "_compiled", no_compiling)
    x, brain = _slices()
    assert not compiled_norm_enabled("auto", "cpu")
    assert compiled_norm_enabled("always", "cpu")
    assert torch.equal(BrainInstanceNorm(compile="auto")(x, brain), BrainInstanceNorm()(x, brain))
    with pytest.raises(ValueError, match="compile"):
        BrainInstanceNorm(compile="yes")


def test_compile_is_saved_and_a_store_without_it_loads_eager(tmp_path: Path) -> None:
    small = build_generator(config.preset("small")["model"])
    assert small.config["compile"] == "auto"
    assert build_generator(config.preset("tiny")["model"]).config["compile"] == "never"
    g = ResnetGenerator(ngf=8, n_blocks=1, compile="auto")
    save_generator(g, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert loaded.config["compile"] == "auto"
    assert {m.compile for m in loaded.modules() if isinstance(m, BrainInstanceNorm)} == {"auto"}
    info = json.loads((tmp_path / "g" / "generator.json").read_text())
    del info["architecture"]["compile"]  # as written before the setting existed
    (tmp_path / "g" / "generator.json").write_text(json.dumps(info))
    assert load_generator(tmp_path / "g").config["compile"] == "never"


def test_a_copy_with_other_run_settings_holds_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=8, n_blocks=1, base_modality="t1c", compile="auto")
    g.bank.add("t2")
    with torch.no_grad():
        for p in g.bank.entry_parameters("t2"):
            p.add_(torch.randn_like(p) * 0.1)
    save_generator(g, tmp_path / "g")
    copy = with_run_settings(tmp_path / "g", tmp_path / "copy", compile="never")
    loaded = load_generator(copy)
    assert loaded.config["compile"] == "never" and load_generator(tmp_path / "g").config["compile"] == "auto"
    original = load_generator(tmp_path / "g").state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    assert loaded.bank.modalities == ["t2"]
    with pytest.raises(ValueError, match="ngf"):
        with_run_settings(tmp_path / "g", tmp_path / "bad", ngf=16)
    with pytest.raises(ValueError, match="compile"):
        with_run_settings(tmp_path / "g", tmp_path / "bad", compile="fast")
    assert not (tmp_path / "bad").exists()
