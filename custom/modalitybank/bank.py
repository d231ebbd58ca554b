"""The modality bank: the per-modality entries of every mAdaFM layer of a network, as one thing.

A network built from :class:`~modalitybank.layers.MAdaFMConv` layers has one frozen *base*
(all ``W, b_conv`` and any other weights) and, per modality, one *entry* (``Γ, B, b`` of every
layer). :class:`ModalityBank` adds, selects, saves and loads entries and the base, and folds an
entry into a plain network for inference.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from modalitybank.layers import MAdaFMConv

__all__ = ["ModalityBank", "atomic_save", "atomic_write_json"]

ENTRY_FORMAT = "modalitybank.entry/1"
BASE_FORMAT = "modalitybank.base/1"


def atomic_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def atomic_write_json(obj: object, path: str | Path) -> Path:
    """JSON to a temporary file, then rename (as :func:`atomic_save`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path


class ModalityBank:
    """A view over the mAdaFM layers of ``network``: its base and its per-modality entries.

    Args:
        network: any module containing :class:`MAdaFMConv` layers.

    Example::

        >>> bank = ModalityBank(generator)
        >>> bank.add("flair"); bank.freeze_base()
        >>> with bank.using("flair"):
        ...     image = generator(mask)
        >>> bank.save_entry("flair", "entries/flair.pt")
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.layers: dict[str, MAdaFMConv] = {
            name: m for name, m in network.named_modules() if isinstance(m, MAdaFMConv)
        }
        if not self.layers:
            raise ValueError(f"{type(network).__name__} has no mAdaFM layers: it cannot hold a modality bank")

    # -- entries ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Names of the entries, in the order they were added."""
        return list(next(iter(self.layers.values())).entries)

    def add(self, name: str) -> None:
        """Add entry ``name`` at the identity modulation: it reproduces the base exactly."""
        if name in self.modalities:
            raise KeyError(f"the bank already has an entry {name!r}")
        for layer in self.layers.values():
            layer.add_entry(name)

    def use(self, name: str | None) -> None:
        """Make entry ``name`` the one every layer uses (``None``: the plain base)."""
        if name is not None and name not in self.modalities:
            raise KeyError(f"no bank entry {name!r}; the bank holds {self.modalities}")
        for layer in self.layers.values():
            layer.active = name

    @property
    def active(self) -> str | None:
        return next(iter(self.layers.values())).active

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Use entry ``name`` inside the block, then restore the previous one."""
        previous = self.active
        self.use(name)
        try:
            yield
        finally:
            self.use(previous)

    def freeze_base(self) -> None:
        """Freeze every parameter of the network that is not a bank entry."""
        entry_params = {id(p) for name in self.modalities for p in self.entry_parameters(name)}
        for p in self.network.parameters():
            if id(p) not in entry_params:
                p.requires_grad_(False)
        for layer in self.layers.values():
            layer.freeze_base()

    def learn(self, names: list[str]) -> list[nn.Parameter]:
        """Get ready to learn entries ``names``: add those missing, freeze the base and every other
        entry, and return the parameters of ``names`` (what the optimiser takes)."""
        for name in names:
            if name not in self.modalities:
                self.add(name)
        self.freeze_base()
        for name in self.modalities:
            if name not in names:
                for p in self.entry_parameters(name):
                    p.requires_grad_(False)
        return [p for name in names for p in self.entry_parameters(name)]

    def entry_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of entry ``name`` across all layers (what an optimiser of that entry takes)."""
        return [p for layer in self.layers.values() for p in layer.entries[name].parameters()]

    def entry_state(self, name: str) -> dict[str, torch.Tensor]:
        """Entry ``name`` as ``{"<layer>.gamma": Γ, "<layer>.beta": B, "<layer>.bias": b}``."""
        return {f"{layer_name}.{k}": v.detach().clone() for layer_name, layer in self.layers.items()
                for k, v in layer.entries[name].named_parameters()}

    def load_entry_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Set entry ``name`` (created if missing) from :meth:`entry_state`'s dictionary."""
        if name not in self.modalities:
            self.add(name)
        expected = set(self.entry_state(name))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"bank entry {name!r} does not fit this generator (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for layer_name, layer in self.layers.items():
                for k, p in layer.entries[name].named_parameters():
                    value = state[f"{layer_name}.{k}"]
                    if value.shape != p.shape:
                        raise ValueError(f"bank entry {name!r}: {layer_name}.{k} has shape {tuple(value.shape)}, "
                                         f"this generator needs {tuple(p.shape)}")
                    p.copy_(value)

    def save_entry(self, name: str, path: str | Path) -> Path:
        """Write entry ``name`` alone to ``path`` (a small file; the base is saved once, separately)."""
        return atomic_save({"format": ENTRY_FORMAT, "modality": name, "state": self.entry_state(name)}, path)

    def load_entry(self, path: str | Path, name: str | None = None) -> str:
        """Load an entry file into the bank (as ``name``, default the name it was saved under)."""
        blob = _load(path, ENTRY_FORMAT)
        name = name or blob["modality"]
        self.load_entry_state(name, blob["state"])
        return name

    # -- base -------------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """Everything in the network's state except bank entries."""
        return {k: v.detach().clone() for k, v in self.network.state_dict().items() if ".entries." not in k}

    def save_base(self, path: str | Path) -> Path:
        return atomic_save({"format": BASE_FORMAT, "state": self.base_state()}, path)

    def load_base(self, path: str | Path) -> None:
        blob = _load(path, BASE_FORMAT)
        missing, unexpected = self.network.load_state_dict(blob["state"], strict=False)
        missing = [k for k in missing if ".entries." not in k]
        if missing or unexpected:
            raise ValueError(f"{path}: base does not fit this generator (missing {missing[:3]}, unexpected {unexpected[:3]})")

    # -- figures ----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """``base_params`` (every non-entry parameter) and ``entry_params`` (one modality's entry)."""
        entry_ids = {id(p) for layer in self.layers.values() for p in layer.entries.parameters()}
        base = sum(p.numel() for p in self.network.parameters() if id(p) not in entry_ids)
        # An entry holds Γ and B per kernel channel pair and b per output channel of every layer.
        entry = sum(2 * layer.weight.shape[0] * layer.weight.shape[1] + (layer.out_channels if layer.bias is not None else 0)
                    for layer in self.layers.values())
        return {"base_params": int(base), "entry_params": int(entry)}

    # -- inference --------------------------------------------------------------------------
    def fold(self, name: str | None) -> nn.Module:
        """A copy of the network with entry ``name`` folded into plain convolutions.

        The copy has no bank and no Python-level switching, so it scripts with TorchScript and
        runs as fast as an ordinary network.
        """
        folded = copy.deepcopy(self.network)
        for layer_name, layer in list(folded.named_modules()):
            if isinstance(layer, MAdaFMConv):
                parent_name, _, child = layer_name.rpartition(".")
                parent = folded.get_submodule(parent_name) if parent_name else folded
                setattr(parent, child, layer.fold(name))
        if isinstance(getattr(folded, "_bank", None), ModalityBank):
            folded._bank = None  # the copy has no bank left to view
        return folded.requires_grad_(False).eval()


def _load(path: str | Path, fmt: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file")
    return blob
