"""mAdaFM layers and the modality bank: the paper's Eq. 2 and the bank's guarantees."""

from __future__ import annotations

import pytest
import torch

from modalitybank.bank import ModalityBank
from modalitybank.layers import MAdaFMConv, weight_statistics
from modalitybank.networks import ResnetGenerator


def _layer(spatial_dims: int, transposed: bool, kernel: int = 3) -> MAdaFMConv:
    torch.manual_seed(0)
    if transposed:
        return MAdaFMConv(spatial_dims, 4, 6, kernel, stride=2, padding=1, transposed=True, output_padding=1)
    return MAdaFMConv(spatial_dims, 4, 6, kernel, stride=1, padding=kernel // 2)


def _input(spatial_dims: int) -> torch.Tensor:
    return torch.randn(2, 4, *([9] * spatial_dims), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel", [1, 3])
def test_new_entry_reproduces_frozen_layer(spatial_dims: int, transposed: bool, kernel: int) -> None:
    layer = _layer(spatial_dims, transposed, kernel)
    x = _input(spatial_dims)
    plain = layer(x).detach()
    layer.add_entry("flair")
    layer.freeze_base()
    layer.active = "flair"
    assert (layer(x) - plain).abs().max().item() < 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_modulated_kernel_is_equation_2(spatial_dims: int, transposed: bool) -> None:
    """Ŵ = Γ ⊙ (W − M)/S + B and b̂ = b + b_conv, with M, S over the spatial dimensions."""
    layer = _layer(spatial_dims, transposed)
    entry = layer.add_entry("t2")
    with torch.no_grad():
        entry.gamma.uniform_(0.5, 2.0)
        entry.beta.normal_()
        entry.bias.normal_()
    w = layer.weight.detach()
    dims = tuple(range(2, w.dim()))
    m = w.mean(dim=dims, keepdim=True)
    s = w.std(dim=dims, keepdim=True, unbiased=False)
    expand = (...,) + (None,) * spatial_dims
    expected_w = entry.gamma[expand] * (w - m) / s + entry.beta[expand]
    weight, bias = layer.modulated("t2")
    torch.testing.assert_close(weight, expected_w)
    torch.testing.assert_close(bias, entry.bias + layer.bias)
    assert entry.gamma.shape == w.shape[:2] and entry.bias.shape == (6,)


def test_weight_statistics_handles_1x1_kernels() -> None:
    w = torch.randn(3, 2, 1, 1)
    mean, std = weight_statistics(w)
    assert torch.equal(mean, w) and torch.equal(std, torch.ones_like(std))


def _generator() -> ResnetGenerator:
    torch.manual_seed(0)
    return ResnetGenerator(ngf=8, n_blocks=1)


def _mask() -> torch.Tensor:
    return torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(2))


def test_only_bank_parameters_train_and_receive_gradients() -> None:
    g = _generator()
    g.bank.add("t1")
    g.bank.freeze_base()
    trainable = [p for p in g.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in g.bank.entry_parameters("t1")}
    g.bank.use("t1")
    g(_mask()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.bank.entry_parameters("t1"))
    assert all(p.grad is None for n, p in g.named_parameters() if ".entries." not in n)


def test_entry_saves_and_loads_bit_exactly(tmp_path) -> None:
    g = _generator()
    g.bank.add("flair")
    with torch.no_grad():
        for p in g.bank.entry_parameters("flair"):
            p.add_(torch.randn_like(p))
    g.bank.save_base(tmp_path / "base.pt")
    path = g.bank.save_entry("flair", tmp_path / "flair.pt")
    assert path.stat().st_size < 0.5 * (tmp_path / "base.pt").stat().st_size  # small: entries only

    other = ResnetGenerator(ngf=8, n_blocks=1)
    other.bank.load_base(tmp_path / "base.pt")
    assert other.bank.load_entry(path) == "flair"
    for k, v in g.bank.entry_state("flair").items():
        assert torch.equal(v, other.bank.entry_state("flair")[k])
    with g.bank.using("flair"), other.bank.using("flair"):
        assert torch.equal(g(_mask()), other(_mask()))


def test_entry_that_does_not_fit_is_refused(tmp_path) -> None:
    g = _generator()
    g.bank.add("t1")
    g.bank.save_entry("t1", tmp_path / "t1.pt")
    wider = ResnetGenerator(ngf=16, n_blocks=1)
    with pytest.raises(ValueError, match="shape"):
        wider.bank.load_entry(tmp_path / "t1.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        g.bank.load_entry(tmp_path / "broken.pt")


def test_adding_and_training_an_entry_leaves_others_unchanged() -> None:
    g = _generator()
    g.bank.add("flair")
    g.bank.freeze_base()
    with torch.no_grad():
        for p in g.bank.entry_parameters("flair"):
            p.add_(0.1 * torch.randn_like(p))
    x = _mask()
    with g.bank.using("flair"):
        before = g(x).detach()
    g.bank.add("t2")
    opt = torch.optim.Adam(g.bank.entry_parameters("t2"), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        with g.bank.using("t2"):
            (g(x) - 1).abs().mean().backward()
        opt.step()
    with g.bank.using("flair"):
        assert torch.equal(g(x), before)
    with g.bank.using("t2"):
        assert not torch.allclose(g(x), before)


def test_fold_gives_the_same_output_and_scripts() -> None:
    g = _generator()
    g.bank.add("t1c")
    g.bank.freeze_base()
    with torch.no_grad():
        for p in g.bank.entry_parameters("t1c"):
            p.mul_(1 + 0.2 * torch.randn_like(p))
    g.eval()
    x = _mask()
    with g.bank.using("t1c"):
        expected = g(x)
    folded = g.bank.fold("t1c")
    assert not any(isinstance(m, MAdaFMConv) for m in folded.modules())
    assert (folded(x) - expected).abs().max().item() < 1e-5
    scripted = torch.jit.script(folded)
    assert (scripted(x) - expected).abs().max().item() < 1e-5


def test_parameter_counts() -> None:
    g = _generator()
    g.bank.add("t1")
    counts = g.bank.parameter_counts()
    assert counts["entry_params"] == sum(p.numel() for p in g.bank.entry_parameters("t1"))
    assert counts["base_params"] == sum(p.numel() for n, p in g.named_parameters() if ".entries." not in n)
    assert counts["entry_params"] < counts["base_params"]


def test_bank_requires_madafm_layers() -> None:
    with pytest.raises(ValueError, match="no mAdaFM layers"):
        ModalityBank(torch.nn.Conv2d(1, 1, 3))
    with pytest.raises(KeyError):
        _generator().bank.use("pd")
