"""The generator on disk: one folder that training, federation, bundles and synthesis share.

::

    generator.json        architecture and provenance (what the base was pre-trained on, ...)
    base.pt               the frozen base, saved once
    entries/<modality>.pt one small file per bank entry
    weights.pt            instead of base + entries, for a plain (AsynDGAN) generator
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modalitybank.bank import atomic_save, atomic_write_json
from modalitybank.networks import ResnetGenerator

__all__ = ["load_generator", "made_modalities", "read_info", "save_generator", "with_run_settings"]

_ARCH_KEYS = ("spatial_dims", "in_channels", "out_channels", "ngf", "n_blocks", "n_downsampling", "modulated",
              "output_modalities", "base_modality", "norm", "precision", "mask_skip",
              "mask_skip_kernel", "compile")

#: The settings a generator saved without them was trained with (norm came in generator bundle 0.3.0,
#: precision and mask_skip in 0.4.0, mask_skip_kernel in 0.5.0, compile in 0.5.3).
_LEGACY_ARCH = {"norm": "instance", "precision": "float32", "mask_skip": False, "mask_skip_kernel": 7,
                "compile": "never"}


def save_generator(generator: ResnetGenerator, folder: str | Path, meta: dict[str, Any] | None = None,
                   modalities: Sequence[str] | None = None) -> Path:
    """Write ``generator`` into ``folder``: the base once and each bank entry (default: all) on its own."""
    folder = Path(folder)
    (folder / "entries").mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"architecture": dict(generator.config), **(meta or {})}
    if generator.config["modulated"]:
        bank = generator.bank
        names = list(bank.modalities if modalities is None else modalities)
        bank.save_base(folder / "base.pt")
        for name in names:
            bank.save_entry(name, folder / "entries" / f"{name}.pt")
        info["modalities"] = sorted({*names, *_saved_entries(folder)})
    else:
        atomic_save({"format": "modalitybank.weights/1", "state": generator.state_dict()}, folder / "weights.pt")
        info["modalities"] = generator.config["output_modalities"]
    atomic_write_json(info, folder / "generator.json")
    return folder


def _saved_entries(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "entries").glob("*.pt"))


def read_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "generator.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no generator here (generator.json missing)")
    info = json.loads(path.read_text())
    info["architecture"] = {**_LEGACY_ARCH, **info["architecture"]}
    return info


def made_modalities(folder: str | Path, with_base: bool = False) -> list[str]:
    """What the generator saved in ``folder`` makes: its bank entries (an entry added later included) or the
    output channels of a plain (AsynDGAN) generator; ``with_base``: also the base's own modality."""
    info = read_info(folder)
    names = list(info.get("modalities") or info["architecture"].get("output_modalities") or [])
    base = info["architecture"].get("base_modality")
    if with_base and base and base not in names:
        names.append(base)
    return names


def load_generator(folder: str | Path, modalities: Sequence[str] | None = None) -> ResnetGenerator:
    """Build the generator saved in ``folder`` with its base and bank entries (default: all saved; the base's
    own modality, when named, needs no entry)."""
    folder = Path(folder)
    info = read_info(folder)
    generator = ResnetGenerator(**{k: info["architecture"].get(k) for k in _ARCH_KEYS})
    if not generator.config["modulated"]:
        blob = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        generator.load_state_dict(blob["state"])
        return generator
    generator.bank.load_base(folder / "base.pt")
    names = _saved_entries(folder) if modalities is None else list(modalities)
    for name in names:
        path = folder / "entries" / f"{name}.pt"
        if not path.is_file() and name == generator.config["base_modality"]:
            continue  # the base makes its own modality without an entry
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no bank entry for {name!r} (have {_saved_entries(folder)})")
        generator.bank.load_entry(path, name)
    generator.bank.freeze_base()
    return generator


#: Architecture settings of how a generator runs, not of what it computes: a copy may change them.
RUN_SETTINGS = ("compile", "precision")


def with_run_settings(folder: str | Path, out: str | Path, **settings: str) -> Path:
    """A copy in ``out`` of the generator saved in ``folder`` (its weights, entries and provenance, not a
    training run's state) with other :data:`RUN_SETTINGS` (e.g. ``compile="never"``), for a benchmark of
    the same weights run another way."""
    unknown = set(settings) - set(RUN_SETTINGS)
    if unknown:
        raise ValueError(f"only {RUN_SETTINGS} can change in a copy, not {sorted(unknown)}")
    folder, out = Path(folder), Path(out)
    info = read_info(folder)
    info["architecture"].update(settings)
    ResnetGenerator(**{k: info["architecture"].get(k) for k in _ARCH_KEYS})  # refuses a bad value before copying
    out.mkdir(parents=True, exist_ok=True)
    for name in ("base.pt", "weights.pt"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    if (folder / "entries").is_dir():
        shutil.copytree(folder / "entries", out / "entries", dirs_exist_ok=True)
    atomic_write_json(info, out / "generator.json")
    return out

