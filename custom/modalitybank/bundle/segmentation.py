"""The segmentation bundle (``bundles/tumor_segmentation``): datalists of real or synthetic cases,
inference cases, per-case metrics as JSON."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

_SEG_LABELS = {"0": "background", "1": "necrosis", "2": "edema", "4": "enhancing"}


def _rel(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path.resolve())


def brats_datalist(root: str | Path, modalities: Sequence[str], out_json: str | Path | None = None,
                   sections: Mapping[str, str] | None = None, grades: Sequence[str] = ("HGG",),
                   centres: Sequence[str] | None = None, present: Sequence[str] | None = None) -> dict[str, Any]:
    """A MONAI datalist of real (or phantom) cases in the BraTS layout.

    Args:
        root: BraTS-layout folder (``splits.json`` decides train/test when present).
        modalities: image channels, in order (e.g. ``["t1c", "t2", "flair"]``).
        out_json: where to write it (optional). Paths are relative to its folder when the data lie
            under it, absolute otherwise.
        sections: datalist section → split; default ``{"training": "train", "validation": "test"}``
            (split ``"all"``: every case).
        centres: keep only the cases of these data centres (default: all).
        present: the modalities the data holds (default: all of ``modalities``). A channel of
            ``modalities`` not in ``present`` is *missing*: its slot points at the file of the first
            present channel and the entry lists it under ``"missing"`` (channel indices), so that
            :class:`~modalitybank.bundle.seg_transforms.FillMissingModalitiesd` blanks it after
            normalisation — a hospital without that modality, as the benchmark's Real-X(n/a) rows
            and the FedAvg sites feed the network.

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
    held = list(modalities) if present is None else [m for m in modalities if m in present]
    if not held:
        raise ValueError(f"present={list(present or [])}: none of the modalities {modalities}")
    blank = [i for i, m in enumerate(modalities) if m not in held]
    if blank:
        datalist["missing_modalities"] = [modalities[i] for i in blank]
    for section, split in (sections or {"training": "train", "validation": "test"}).items():
        entries = []
        for record in split_cases(records, root, split):
            if centres is not None and record.centre not in centres:
                continue
            absent = [m for m in held if m not in record.files]
            if absent:
                raise BratsDataError(f"case {record.case_id}: missing file {record.expected_file(absent[0])} "
                                     f"(modality {absent[0]})")
            files = [record.files[m if m in held else held[0]] for m in modalities]
            entry = {"image": [_rel(f, base) for f in files], "label": _rel(record.files["seg"], base),
                     "case": record.case_id, "centre": record.centre}
            if blank:
                entry["missing"] = blank
            entries.append(entry)
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


def datalist_file(dataset_dir: str | Path, modalities: Sequence[str], work_dir: str | Path,
                  val_split: str = "test") -> str:
    """The datalist JSON for ``dataset_dir``, with the image channels in the order of ``modalities``.

    ``val_split`` is the split of a BraTS-layout folder that becomes the ``validation`` section:
    ``"test"`` (its held-out cases) or ``"all"`` (every case: a folder that *is* the test set).

    * a ``.json`` file, or a folder holding ``datalist.json`` (what ``modalitybank synthesize``
      writes): used as it is when its ``modalities`` are ``modalities``; otherwise a copy with the
      channels selected and reordered is written into ``work_dir``;
    * a BraTS-layout folder: :func:`brats_datalist` into ``work_dir``.
    """
    dataset_dir, work_dir = Path(dataset_dir), Path(work_dir)
    modalities = list(modalities)
    source = dataset_dir if dataset_dir.suffix == ".json" else dataset_dir / "datalist.json"
    key = hashlib.sha256(f"{dataset_dir.resolve()}|{modalities}|{val_split}".encode()).hexdigest()[:10]
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
    brats_datalist(dataset_dir, modalities, out, sections={"training": "train", "validation": val_split})
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
