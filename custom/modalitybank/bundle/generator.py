"""The generator bundle (``bundles/modalitybank_generator``): its ``network_def`` (the generator with
its base and every bank entry, making the modality named by the config key ``modality``), publishing a
run into ``models/`` (store layout plus ``model.pt``), label maps → NIfTI per modality."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalitybank import config
from modalitybank.networks import ResnetGenerator


def _tag(modality: str) -> torch.Tensor:
    raw = modality.encode()[:32]
    return torch.tensor(list(raw) + [0] * (32 - len(raw)), dtype=torch.uint8)


class FoldedGenerator(nn.Module):
    """The generator with one bank entry folded in: a plain network that TorchScript scripts.

    It carries the entry's name as a buffer (``modality_tag``); loading the state of a generator
    folded for another modality raises, so ``ckpt_export`` with the wrong ``--ckpt_file`` fails
    loudly instead of exporting the wrong modality.

    Shapes: ``(N, 5, H, W)`` mask channels → ``(N, 1, H, W)`` image in [-1, 1].
    """

    def __init__(self, net: nn.Module, modality: str) -> None:
        super().__init__()
        self.net = net
        self.modality = modality
        self.register_buffer("modality_tag", _tag(modality))
        self.register_load_state_dict_pre_hook(_check_tag)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check_tag(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    tag = state_dict.get(prefix + "modality_tag")
    if tag is not None and not torch.equal(tag.to(torch.uint8), module.modality_tag):
        found = bytes(tag.tolist()).rstrip(b"\0").decode(errors="replace")
        error_msgs.append(f"this checkpoint is the generator folded for {found!r}, "
                          f"not for {module.modality!r}")


class BankGenerator(nn.Module):
    """The bank generator with its frozen base and every bank entry, making one modality: the bundle's
    ``network_def``.

    Its state (``model.pt``) is the whole generator — the base and all entries — so one checkpoint
    serves every modality; ``modality`` only selects which entry the forward pass uses. Eager, the
    entry modulates the base on the fly (mAdaFM, exactly as in training). ``torch.jit.script`` (what
    ``ckpt_export`` runs) scripts :meth:`fold`'s network instead, through ``__prepare_scriptable__``:
    the selected entry folded into plain convolutions, the same function of the input.

    Args:
        architecture: the :class:`~modalitybank.networks.ResnetGenerator` arguments, as
            ``generator.json`` stores them under ``"architecture"`` (``modulated`` must be true).
        modalities: the bank entries the generator holds (all of them: their parameters are its state).
        modality: the modality it makes: one of ``modalities``, or the base's own modality
            (``architecture["base_modality"]``, made without an entry) when no entry has that name.

    Shapes: ``(N, 5, H, W)`` mask channels (:func:`~modalitybank.networks.mask_channels`) →
    ``(N, 1, H, W)`` image in [-1, 1]; ``H, W`` divisible by ``2 ** n_downsampling``.

    Example::

        >>> net = BankGenerator(read_info("models")["architecture"], ["t1c", "t2", "flair"], "t2")
        >>> net.load_state_dict(torch.load("models/model.pt", weights_only=True))
        >>> torch.jit.script(net)  # the T2 generator, entry folded in
    """

    def __init__(self, architecture: Mapping[str, Any], modalities: Sequence[str], modality: str) -> None:
        super().__init__()
        arch = dict(architecture)
        if not arch.get("modulated", True):
            raise ValueError("a plain multi-channel (AsynDGAN) generator has no bank entries to select from")
        generator = ResnetGenerator(**arch)
        for name in modalities:
            generator.bank.add(name)
        generator.bank.freeze_base()
        if modality in modalities:
            entry: str | None = modality
        elif modality == arch.get("base_modality"):
            entry = None
        else:
            makes = [*modalities, *([arch["base_modality"]] if arch.get("base_modality") else [])]
            raise KeyError(f"the generator makes {makes}, not {modality!r}")
        generator.bank.use(entry)
        self.generator = generator
        self.modality = modality
        self.entry = entry

    @classmethod
    def from_store(cls, models_dir: str | Path, modality: str | None = None) -> BankGenerator:
        """The generator saved in ``models_dir`` (store layout: ``generator.json``, ``base.pt``,
        ``entries/<m>.pt``), making ``modality`` (default: its first entry)."""
        from modalitybank.store import load_generator, read_info

        info = read_info(models_dir)
        generator = load_generator(models_dir)
        entries = generator.bank.modalities  # the entries saved in models_dir
        net = cls(info["architecture"], entries, modality or (entries or [info["architecture"]["base_modality"]])[0])
        net.generator.load_state_dict(generator.state_dict())
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x)

    def fold(self) -> FoldedGenerator:
        """The selected entry folded into plain convolutions (no bank left): a scriptable copy."""
        return FoldedGenerator(self.generator.bank.fold(self.entry), self.modality).eval()

    def __prepare_scriptable__(self) -> FoldedGenerator:
        return self.fold()


def load_weights(network: nn.Module, ckpt_path: str | Path) -> nn.Module:
    """``network`` with the state dictionary at ``ckpt_path`` loaded (strictly), in eval mode."""
    network.load_state_dict(torch.load(str(ckpt_path), map_location="cpu", weights_only=True))
    return network.eval()


def save_model_checkpoint(models_dir: str | Path, path: str | Path | None = None) -> str:
    """Write the state of :meth:`BankGenerator.from_store` (``models_dir``) to ``path``
    (default ``models_dir/model.pt``): the checkpoint of the bundle's ``network_def``."""
    from modalitybank.bank import atomic_save

    path = Path(models_dir) / "model.pt" if path is None else Path(path)
    return str(atomic_save(BankGenerator.from_store(models_dir).state_dict(), path))


def generator_modalities(models_dir: str | Path) -> list[str]:
    """What the generator in ``models_dir`` makes: its bank entries and the base's own modality."""
    from modalitybank.store import made_modalities

    return made_modalities(models_dir, with_base=True)


def folded_generator(models_dir: str | Path, modality: str) -> FoldedGenerator:
    """The generator saved in ``models_dir`` (store layout) with entry ``modality`` folded in.

    ``modality`` may also be the base's own modality (what it was pre-trained on) when the bank
    has no entry of that name. Raises ``KeyError`` naming what the generator holds otherwise.
    """
    from modalitybank.store import load_generator, read_info

    info = read_info(models_dir)
    arch = info["architecture"]
    if not arch["modulated"]:
        raise ValueError(f"{models_dir}: a plain multi-channel (AsynDGAN) generator has no bank entry to fold")
    entries = list(info.get("modalities") or [])
    if modality in entries:
        generator = load_generator(models_dir, [modality])
        folded = generator.bank.fold(modality)
    elif modality == arch.get("base_modality"):
        folded = load_generator(models_dir, []).bank.fold(None)
    else:
        raise KeyError(f"{models_dir}: the generator makes {generator_modalities(models_dir)}, not {modality!r}")
    return FoldedGenerator(folded, modality).eval()


_STORE_FILES = ("generator.json", "base.pt", "weights.pt")


def publish_generator(run_dir: str | Path, models_dir: str | Path) -> dict[str, Any]:
    """Copy the generator of a training run (store layout) into a bundle's ``models/``.

    Copies ``generator.json``, ``base.pt`` and ``entries/<m>.pt`` (or ``weights.pt``); entries in
    ``models_dir`` that the run does not have are removed, so ``models/`` mirrors the run, and so are
    exports of the previous generator (``model.ts``, ``model_<m>.pt``, ``model_<m>.ts``). For a bank
    generator it then writes ``model.pt`` (:func:`save_model_checkpoint`): base and every entry in one
    state dictionary, what the inference config's ``network_def`` loads.
    Absolute paths in ``generator.json`` (the data root, the pre-trained run) are reduced to their
    last component: a published bundle names no folder of the machine it was trained on.
    """
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    info = json.loads((run_dir / "generator.json").read_text())
    for key in ("data_root", "pretrained_from"):
        if isinstance(info.get(key), str) and os.path.isabs(info[key]):
            info[key] = Path(info[key]).name
    (models_dir / "entries").mkdir(parents=True, exist_ok=True)
    for name in _STORE_FILES[1:]:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, models_dir / name)
    entries = sorted((run_dir / "entries").glob("*.pt")) if (run_dir / "entries").is_dir() else []
    for stale in (models_dir / "entries").glob("*.pt"):
        if stale.name not in {e.name for e in entries}:
            stale.unlink()
    for entry in entries:
        shutil.copyfile(entry, models_dir / "entries" / entry.name)
    if info["architecture"].get("modulated"):
        info["modalities"] = sorted(e.stem for e in entries)  # what models/ holds
    for derived in [*models_dir.glob("model*.pt"), *models_dir.glob("model*.ts")]:
        derived.unlink()  # exports of the previous generator
    (models_dir / "generator.json").write_text(json.dumps(info, indent=2))
    checkpoint = save_model_checkpoint(models_dir) if info["architecture"].get("modulated") else None
    return {"models_dir": str(models_dir), "modalities": [e.stem for e in entries], "stage": info.get("stage"),
            "model": checkpoint}


def label_map_items(dataset_dir: str | Path, split: str = "test", grades: Sequence[str] = ("HGG",)) -> list[dict]:
    """``[{"label": seg, "brain": image, "case": id}]`` for the cases of a BraTS-layout folder.

    ``brain`` is the first modality file present (T1, T1c, T2, FLAIR): the brain mask is where it
    is non-zero. Override the bundle's ``data`` key to pass label maps and brain masks directly.
    """
    from modalitybank.data.brats import scan_cases, split_cases

    items = []
    for record in split_cases(scan_cases(dataset_dir, grades), Path(dataset_dir), split):
        present = [m for m in config.MODALITIES if m in record.files]
        items.append({"label": str(record.files["seg"]), "brain": str(record.files[present[0]]) if present else None,
                      "case": record.case_id})
    return items


def _case_name(path: str | Path) -> str:
    name = Path(path).name
    name = re.sub(r"\.nii(\.gz)?$", "", name)
    return re.sub(r"_seg$", "", name)


def synthesize_items(generator: ResnetGenerator, items: Sequence[Mapping[str, Any]], modalities: Sequence[str],
                     output_dir: str | Path, image_size: int) -> list[dict[str, Any]]:
    """Synthesise ``modalities`` for each label map: NIfTI files with the label map's shape and affine.

    Args:
        generator: a generator holding ``modalities`` (bank entries or its base modality).
        items: ``{"label": NIfTI label map (BraTS labels 0, 1, 2, 4), "brain": NIfTI brain mask or any
            image of the case (non-zero = brain), "case": optional name}``.
        output_dir: writes ``<output_dir>/<case>/<case>_<suffix>.nii.gz`` (BraTS file names).
        image_size: the generator's slice size.

    Returns ``[{"case": .., "files": {modality: path}}]``.
    """
    import nibabel as nib
    import numpy as np

    from modalitybank.data.brats_cases import BratsDataError, check_labels
    from modalitybank.synthesis import synthesize_volume

    written = []
    for item in items:
        label_path = Path(item["label"])
        if item.get("brain") is None:
            raise ValueError(f"{label_path}: no brain mask given (item key 'brain': a mask or any image of the case)")
        label_img = nib.load(str(label_path))
        seg = np.asarray(label_img.dataobj)
        if seg.ndim != 3:
            raise BratsDataError(f"{label_path}: expected a 3D label map, got shape {seg.shape}")
        check_labels(seg, label_path)
        brain_path = Path(item["brain"])
        brain = np.asarray(nib.load(str(brain_path)).dataobj)
        if brain.shape != seg.shape:
            raise BratsDataError(f"{brain_path}: shape {brain.shape} differs from the label map {label_path} {seg.shape}")
        case = str(item.get("case") or _case_name(label_path))
        volumes = synthesize_volume(generator, seg.astype(np.uint8), brain > 0, list(modalities), int(image_size))
        case_dir = Path(output_dir) / case
        case_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for m in modalities:
            path = case_dir / f"{case}_{config.MODALITY_SUFFIX[m]}.nii.gz"
            nib.save(nib.Nifti1Image(volumes[m], label_img.affine), str(path))
            files[m] = str(path)
        written.append({"case": case, "files": files})
    return written
