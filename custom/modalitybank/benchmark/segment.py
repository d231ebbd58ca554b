"""Every row's segmentation network, trained and evaluated by the ``tumor_segmentation`` bundle.

Training is ``python -m monai.bundle run`` on ``train.json`` + ``train_budget.json`` (a fixed
iteration budget, the final weights kept, no model selection on the test cases); evaluation is
``train.json`` + ``evaluate.json`` on the held-out real test cases (Dice, sensitivity,
specificity, HD95 in mm, per case). One network definition, one preprocessing, one trainer, one
evaluator for every row; each command's output goes to a log file next to its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalitybank.benchmark.plan import Budget
from modalitybank.resources import bundle_dir

__all__ = ["SEGMENTATION_BUNDLE", "bundle_command", "evaluate", "example_prediction", "train"]

SEGMENTATION_BUNDLE = "tumor_segmentation"
METRICS = {"dice": "val_mean_dice", "sens": "val_sensitivity", "spec": "val_specificity", "hd95": "val_hd95"}


def _configs(*names: str) -> str:
    root = bundle_dir(SEGMENTATION_BUNDLE) / "configs"
    return "[" + ",".join(f"'{root / n}'" for n in names) + "]"


def bundle_command(configs: Sequence[str], log: Path, **overrides: Any) -> None:
    """``python -m monai.bundle run`` with ``configs`` of the segmentation bundle and ``overrides``;
    output to ``log``. Raises ``RuntimeError`` with the log's tail if the command fails."""
    root = bundle_dir(SEGMENTATION_BUNDLE)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(*configs),
           "--meta_file", str(root / "configs" / "metadata.json"), "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list | tuple) else str(value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"segmentation bundle failed (exit {code}): {' '.join(cmd)}\n{log}:\n{tail}")


def train(datalist: str | Path, out: Path, modalities: Sequence[str], budget: Budget, seed: int) -> Path:
    """Train the bundle's network on ``datalist``'s ``training`` section for ``budget.iterations``
    iterations; returns ``out/models/model.pt`` (the final weights). A finished training in ``out``
    (``trained.json`` beside the weights) is kept: an interrupted row resumes at its evaluation."""
    model, done = out / "models" / "model.pt", out / "trained.json"
    if model.is_file() and done.is_file():
        return model
    bundle_command(["train.json", "train_budget.json"], out / "train.log", dataset_dir=str(datalist),
                   ckpt_dir=str(out / "models"), output_dir=str(out / "train"), modalities=list(modalities),
                   max_epochs=budget.max_epochs, epoch_length=budget.epoch_length, num_samples=budget.num_samples,
                   learning_rate=budget.learning_rate, seed=seed, **{"train#dataloader#batch_size": budget.batch_size})
    if not model.is_file():
        raise RuntimeError(f"segmentation training wrote no {model}; see {out / 'train.log'}")
    done.write_text(json.dumps({"iterations": budget.max_epochs * budget.epoch_length, "seed": seed,
                                "datalist": str(datalist)}))
    return model


def evaluate(models: Path, test_data: str | Path, val_split: str, out: Path, modalities: Sequence[str],
             present: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate ``models/model.pt`` on the test cases; per-case and mean metrics (dice/sens/spec as
    fractions, hd95 in mm) as ``{"per_case": {case: {metric: v}}, "mean": {...}, "std": {...}}``.

    ``present``: the modalities the network was trained with; the others are blanked in the test
    cases too (the same ``FillMissingModalitiesd``), as a hospital without them would deploy it.
    """
    from modalitybank.bundle.segmentation import brats_datalist

    extra = {}
    if present is not None:
        datalist = out / "test_datalist.json"
        brats_datalist(test_data, modalities, datalist, sections={"validation": val_split}, present=present)
        extra["val_datalist"] = str(datalist)
    bundle_command(["train.json", "evaluate.json"], out / "evaluate.log", ckpt_dir=str(models),
                   output_dir=str(out), val_dataset_dir=str(test_data), val_split=val_split,
                   modalities=list(modalities), **extra)
    raw = json.loads((out / "metrics.json").read_text())["per_case"]
    cases = sorted(raw[METRICS["dice"]])
    per_case = {c: {k: float(raw[m][c]) for k, m in METRICS.items()} for c in cases}
    return {"per_case": per_case, **summarise(per_case)}


def summarise(per_case: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over cases of each metric (NaN HD95 — an empty prediction — left out)."""
    mean, std = {}, {}
    for k in METRICS:
        values = np.array([v[k] for v in per_case.values()], dtype=float)
        values = values[np.isfinite(values)]
        mean[k] = float(values.mean()) if values.size else float("nan")
        std[k] = float(values.std()) if values.size else float("nan")
    return {"mean": mean, "std": std}


def example_prediction(models: Path, case: dict[str, Any], modalities: Sequence[str], out: Path) -> Path:
    """The row's prediction for one test case (a datalist entry: ``image``, ``label``, optional
    ``missing``) through the bundle's evaluation preprocessing and inferer, saved with the image and
    label of the slice with the most tumour (``example.npz``)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir(SEGMENTATION_BUNDLE) / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle_dir(SEGMENTATION_BUNDLE)), "modalities": list(modalities),
                   "device": "$torch.device('cpu')"})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    item = parser.get_parsed_content("validate#preprocessing")(
        {k: case[k] for k in ("image", "label", "missing") if k in case})
    inferer = parser.get_parsed_content("validate#inferer")
    with torch.no_grad():
        pred = inferer(item["image"][None].float(), net).argmax(1)[0].numpy()
    label = item["label"][0].numpy() > 0
    z = int(np.argmax(label.sum(axis=(0, 1))))
    path = out / "example.npz"
    np.savez_compressed(path, image=item["image"][:, :, :, z].numpy().astype(np.float32), label=label[:, :, z],
                        pred=pred[:, :, z].astype(bool))
    return path
