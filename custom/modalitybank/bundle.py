"""What the MONAI bundles in ``bundles/`` call, so that the bundles need no ``scripts`` module.

Configs reach this module with ``"$import modalitybank.bundle"`` (or, where a config must also load
in an environment without this package, such as MONAI Label's, lazily through
``"$__import__('modalitybank.bundle').bundle.<fn>(...)"`` in keys MONAI Label does not read).

* ``bundles/modalitybank_generator`` — :func:`folded_generator` (its ``network_def``: the generator
  with one bank entry folded into plain convolutions, for ``verify_net_in_out`` / ``ckpt_export``),
  :func:`save_folded_state`, :func:`publish_generator` (copies a training run's generator into the
  bundle's ``models/``), :func:`label_map_items` and :func:`synthesize_items` (NIfTI label maps in,
  one NIfTI per modality out).
* ``bundles/site_discriminator`` — :class:`JointInputDiscriminator` (the site discriminator as a
  one-input network) and :func:`site_discriminator_from_bundle` (discriminator, optimiser and loss
  weights as a site builds them).
* ``bundles/tumor_segmentation`` — :func:`brats_datalist`, :func:`datalist_file`,
  :func:`load_datalist`, :func:`inference_cases` and :func:`write_metrics_json`.
* All bundles — :func:`locate_bundle_root` (the default ``bundle_root``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalitybank import config
from modalitybank.networks import MASK_CHANNELS, ResnetGenerator

__all__ = [
    "FoldedGenerator",
    "JointInputDiscriminator",
    "brats_datalist",
    "datalist_file",
    "folded_generator",
    "generator_modalities",
    "inference_cases",
    "label_map_items",
    "load_datalist",
    "locate_bundle_root",
    "publish_generator",
    "save_folded_state",
    "site_discriminator_from_bundle",
    "synthesize_items",
    "write_metrics_json",
]

_CONFIG_FLAGS = ("--config_file", "--meta_file")


# -- every bundle ---------------------------------------------------------------------------------
def locate_bundle_root(default: str = ".") -> str:
    """The bundle folder of the config file named on the command line, else ``default``.

    ``python -m monai.bundle run --config_file bundles/x/configs/train.json`` gives ``bundles/x``,
    so a bundle run from any working directory writes into its own ``models/`` and ``eval/``.
    Without such an argument (a config loaded from Python) it is ``default`` — ``"."``, the model
    zoo's convention. ``--bundle_root DIR`` on the command line overrides the key altogether.
    """
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag not in _CONFIG_FLAGS:
            continue
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        # fire accepts a list such as "['a/configs/train.json','a/configs/evaluate.json']"
        first = re.split(r"[\[\],'\"\s]+", value.strip())
        first = [f for f in first if f]
        if first:
            configs = Path(first[0]).resolve().parent
            return str(configs.parent if configs.name == "configs" else configs)
    return default


# -- the generator bundle -------------------------------------------------------------------------
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


def generator_modalities(models_dir: str | Path) -> list[str]:
    """What the generator in ``models_dir`` makes: its bank entries and the base's own modality."""
    from modalitybank.store import read_info

    info = read_info(models_dir)
    names = list(info.get("modalities") or [])
    base = info["architecture"].get("base_modality")
    if base and base not in names:
        names.append(base)
    return names


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


def save_folded_state(network: nn.Module, path: str | Path) -> str:
    """Write ``network.state_dict()`` to ``path`` (what ``ckpt_export --ckpt_file`` loads)."""
    from modalitybank.bank import atomic_save

    return str(atomic_save(network.state_dict(), path))


_STORE_FILES = ("generator.json", "base.pt", "weights.pt")


def publish_generator(run_dir: str | Path, models_dir: str | Path) -> dict[str, Any]:
    """Copy the generator of a training run (store layout) into a bundle's ``models/``.

    Copies ``generator.json``, ``base.pt`` and ``entries/<m>.pt`` (or ``weights.pt``); entries in
    ``models_dir`` that the run does not have are removed, so ``models/`` mirrors the run, and so are
    folded exports of the previous generator (``model_<m>.pt``, ``model_<m>.ts``).
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
    for derived in [*models_dir.glob("model_*.pt"), *models_dir.glob("model_*.ts")]:
        derived.unlink()  # folded exports of the previous generator
    (models_dir / "generator.json").write_text(json.dumps(info, indent=2))
    return {"models_dir": str(models_dir), "modalities": [e.stem for e in entries], "stage": info.get("stage")}


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

    from modalitybank.data.brats import BratsDataError
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
        bad = sorted(set(np.unique(seg).tolist()) - set(config.BRATS_LABELS))
        if bad:
            raise BratsDataError(f"{label_path}: labels outside {{0,1,2,4}} present: {bad[:10]}")
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


# -- the site discriminator bundle ----------------------------------------------------------------
class JointInputDiscriminator(nn.Module):
    """A conditional discriminator ``D(mask, image)`` as a one-input network ``D([mask, image])``.

    MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``) feed one tensor; this splits
    its channels into the mask channels (the first ``mask_channels``) and the image.
    """

    def __init__(self, discriminator: nn.Module, mask_channels: int = MASK_CHANNELS) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.mask_channels = mask_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x[:, : self.mask_channels], x[:, self.mask_channels:])


def site_discriminator_from_bundle(bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None,
                                   config_file: str = "train.json") -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A site's discriminator, its optimiser and the GAN loss weights, from the site-discriminator bundle.

    Args:
        bundle_dir: the bundle folder (``bundles/site_discriminator``).
        overrides: config ids to override, e.g. ``{"scale": "small"}`` or ``{"optimizer#lr": 1e-4}``.
        config_file: the config in ``configs/`` to read.

    Returns ``(discriminator, optimizer, gan_loss)``: a fresh
    :class:`~modalitybank.networks.ConditionalDiscriminator` (``D(mask, image)``), an optimiser over
    its parameters and a :class:`~modalitybank.gan.GanLoss` — what :func:`modalitybank.gan.site_step` takes.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / config_file))
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    parser.parse(reset=True)
    return (parser.get_parsed_content("discriminator"), parser.get_parsed_content("optimizer"),
            parser.get_parsed_content("gan_loss"))


# -- the segmentation bundle ----------------------------------------------------------------------
_SEG_LABELS = {"0": "background", "1": "necrosis", "2": "edema", "4": "enhancing"}


def _rel(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path.resolve())


def brats_datalist(root: str | Path, modalities: Sequence[str], out_json: str | Path | None = None,
                   sections: Mapping[str, str] | None = None, grades: Sequence[str] = ("HGG",)) -> dict[str, Any]:
    """A MONAI datalist of real (or phantom) cases in the BraTS layout.

    Args:
        root: BraTS-layout folder (``splits.json`` decides train/test when present).
        modalities: image channels, in order (e.g. ``["t1c", "t2", "flair"]``).
        out_json: where to write it (optional). Paths are relative to its folder when the data lie
            under it, absolute otherwise.
        sections: datalist section → split; default ``{"training": "train", "validation": "test"}``.

    Returns ``{"training": [{"image": [..], "label": seg, "case": id, "centre": ..}], "validation": [..],
    "modalities": [..], "labels": {..}}`` — the layout ``modalitybank synthesize`` writes too.
    """
    from modalitybank.data.brats import BratsDataError, _check_modalities, scan_cases, split_cases

    modalities = list(_check_modalities(modalities))
    root = Path(root)
    base = Path(out_json).parent if out_json is not None else None
    records = scan_cases(root, grades)
    datalist: dict[str, Any] = {"description": f"BraTS-layout cases of {root.name}", "modalities": modalities,
                                "labels": dict(_SEG_LABELS)}
    for section, split in (sections or {"training": "train", "validation": "test"}).items():
        entries = []
        for record in split_cases(records, root, split):
            missing = [m for m in modalities if m not in record.files]
            if missing:
                raise BratsDataError(f"case {record.case_id}: missing file {record.expected_file(missing[0])} "
                                     f"(modality {missing[0]})")
            entries.append({"image": [_rel(record.files[m], base) for m in modalities],
                            "label": _rel(record.files["seg"], base), "case": record.case_id,
                            "centre": record.centre})
        datalist[section] = entries
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(datalist, indent=2))
    return datalist


def _read_datalist(source: Path, modalities: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """A datalist JSON with its image channels selected and ordered as ``modalities``.

    Returns ``(datalist, changed)``; when ``changed``, the paths of the returned datalist are absolute.
    """
    datalist = json.loads(source.read_text())
    have = datalist.get("modalities")
    if have is None or list(have) == list(modalities):
        return datalist, False
    missing = [m for m in modalities if m not in have]
    if missing:
        raise ValueError(f"{source}: has modalities {have}, not {missing}")
    index = [have.index(m) for m in modalities]
    for entries in datalist.values():
        for e in entries if isinstance(entries, list) else []:
            if isinstance(e, dict) and isinstance(e.get("image"), list):
                e["image"] = [str((source.parent / e["image"][i]).resolve()) for i in index]
                if isinstance(e.get("label"), str):
                    e["label"] = str((source.parent / e["label"]).resolve())
    datalist["modalities"] = list(modalities)
    return datalist, True


def datalist_file(dataset_dir: str | Path, modalities: Sequence[str], work_dir: str | Path) -> str:
    """The datalist JSON for ``dataset_dir``, with the image channels in the order of ``modalities``.

    * a ``.json`` file, or a folder holding ``datalist.json`` (what ``modalitybank synthesize``
      writes): used as it is when its ``modalities`` are ``modalities``; otherwise a copy with the
      channels selected and reordered is written into ``work_dir``;
    * a BraTS-layout folder: :func:`brats_datalist` into ``work_dir``.
    """
    dataset_dir, work_dir = Path(dataset_dir), Path(work_dir)
    modalities = list(modalities)
    source = dataset_dir if dataset_dir.suffix == ".json" else dataset_dir / "datalist.json"
    key = hashlib.sha256(f"{dataset_dir.resolve()}|{modalities}".encode()).hexdigest()[:10]
    out = work_dir / f"datalist_{dataset_dir.stem}_{key}.json"
    if source.is_file():
        datalist, changed = _read_datalist(source, modalities)
        if not changed:
            return str(source)
        work_dir.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(datalist, indent=2))
        return str(out)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir}: no such data folder or datalist")
    brats_datalist(dataset_dir, modalities, out)
    return str(out)


def load_datalist(path: str | Path, section: str) -> list[dict[str, Any]]:
    """Section ``section`` of a datalist JSON, with paths made absolute (MONAI's decathlon loader)."""
    from monai.data import load_decathlon_datalist

    sections = [k for k, v in json.loads(Path(path).read_text()).items() if isinstance(v, list)]
    if section not in sections:
        hint = (" (a synthetic set has only 'training': validate on real cases with --val_dataset_dir)"
                if section == "validation" else "")
        raise ValueError(f"{path}: no {section!r} section (it has {sections}){hint}")
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=section)


def inference_cases(dataset_dir: str | Path, modalities: Sequence[str], split: str = "all",
                    grades: Sequence[str] = ("HGG",)) -> list[dict[str, Any]]:
    """Inputs for segmentation inference: ``[{"image": [one file per modality] or one multi-channel file}]``.

    ``dataset_dir`` may be a BraTS-layout folder (cases of ``split`` and ``grades``), a folder with a
    ``datalist.json`` (all its entries) or a folder of multi-channel NIfTI files (one per case).
    """
    dataset_dir = Path(dataset_dir)
    if any((dataset_dir / g).is_dir() for g in ("HGG", "LGG")):
        sections = {"all": "all"} if split == "all" else {split: split}
        datalist = brats_datalist(dataset_dir, modalities, sections=sections, grades=grades)
        return [{"image": e["image"], "case": e["case"]} for e in datalist[next(iter(sections))]]
    if (dataset_dir / "datalist.json").is_file():
        datalist, _ = _read_datalist(dataset_dir / "datalist.json", modalities)
        out = []
        for entries in datalist.values():
            for e in entries if isinstance(entries, list) else []:
                if isinstance(e, dict) and "image" in e:
                    images = e["image"] if isinstance(e["image"], list) else [e["image"]]
                    out.append({"image": [str(dataset_dir / p) for p in images]})
        return out
    files = sorted(p for p in dataset_dir.glob("*.nii*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{dataset_dir}: no BraTS layout, datalist.json or NIfTI files found")
    return [{"image": str(p)} for p in files]


def write_metrics_json(output_dir: str | Path, evaluator: Any = None) -> str:
    """Per-case and summary metrics of an evaluation run as ``metrics.json`` (and CSV).

    Reads the CSV files MONAI's ``MetricsSaver`` wrote into ``output_dir`` (``metrics.csv``,
    ``<metric>_raw.csv``, ``<metric>_summary.csv``). With ``evaluator`` (the engine that ran), the
    per-case details of its ``ConfusionMatrix`` metrics — confusion matrices, which ``MetricsSaver``
    cannot write — become per-case values in ``<metric>_raw.csv`` first; the metric is the one its
    name contains (``sensitivity``, ``specificity`` or ``precision``, e.g. ``val_sensitivity``).

    ``{"summary": {metric: value}, "per_case": {metric: {case: value}}, "statistics": {metric: {mean, median, ...}}}``.
    """
    output_dir = Path(output_dir)
    if evaluator is not None:
        _write_confusion_details(output_dir, evaluator)
    result: dict[str, Any] = {"summary": {}, "per_case": {}, "statistics": {}}
    metrics_csv = output_dir / "metrics.csv"
    if metrics_csv.is_file():
        for row in csv.reader(metrics_csv.read_text().splitlines(), delimiter=","):
            if len(row) >= 2:
                result["summary"][row[0]] = _number(row[1])
    for raw in sorted(output_dir.glob("*_raw.csv")):  # filename, class0, ..., mean
        name = raw.name[: -len("_raw.csv")]
        rows = list(csv.reader(raw.read_text().splitlines()))
        result["per_case"][name] = {_case_of(r[0]): _number(r[-1]) for r in rows[1:] if len(r) >= 2}
    for summary in sorted(output_dir.glob("*_summary.csv")):  # class, mean, median, ...; last row: "mean"
        name = summary.name[: -len("_summary.csv")]
        rows = list(csv.reader(summary.read_text().splitlines()))
        if len(rows) >= 2:
            header = rows[0][1:]
            result["statistics"][name] = {h: _number(v) for h, v in zip(header, rows[-1][1:], strict=False)}
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(result, indent=2))
    return str(path)


_CONFUSION = {  # metric name -> f(tp, fp, tn, fn)
    "sensitivity": lambda tp, fp, tn, fn: tp / (tp + fn),
    "specificity": lambda tp, fp, tn, fn: tn / (tn + fp),
    "precision": lambda tp, fp, tn, fn: tp / (tp + fp),
}


def _write_confusion_details(output_dir: Path, evaluator: Any) -> None:
    import numpy as np

    details = getattr(evaluator.state, "metric_details", {}) or {}
    data = getattr(getattr(evaluator.data_loader, "dataset", None), "data", None) or []
    names = []
    for item in data:
        image = item.get("image") if isinstance(item, Mapping) else None
        names.append(str(image[0] if isinstance(image, list | tuple) else image))
    for key, value in details.items():
        value = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if value.ndim != 3 or value.shape[-1] != 4:
            continue
        metric = next((m for m in _CONFUSION if m in key), None)
        if metric is None:
            continue
        tp, fp, tn, fn = (value[..., i].astype(np.float64) for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class = _CONFUSION[metric](tp, fp, tn, fn)  # (cases, classes)
        labels = [f"class{i}" for i in range(per_class.shape[1])] + ["mean"]
        lines = ["filename," + ",".join(labels)]
        for i, row in enumerate(per_class):
            name = names[i] if i < len(names) else str(i)
            values = [*row.tolist(), float(np.nanmean(row)) if np.isfinite(row).any() else float("nan")]
            lines.append(name + "," + ",".join(f"{v:.4f}" for v in values))
        (output_dir / f"{key}_raw.csv").write_text("\n".join(lines) + "\n")


def _case_of(filename: str) -> str:
    """``.../Brats18_X_1_t1ce.nii.gz`` → ``Brats18_X_1`` (the case of a per-case metrics row)."""
    name = re.sub(r"\.nii(\.gz)?$", "", Path(filename).name)
    return re.sub(r"_(t1|t1ce|t2|flair)$", "", name)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
