"""What a finished run shows: held-out image quality, a Fig. 2/3-style grid, loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modalitybank import config
from modalitybank.data.brats import SiteDataset, site_datasets, slice_settings
from modalitybank.figures import loss_curves, modality_grid
from modalitybank.store import load_generator, made_modalities, read_info
from modalitybank.synthesis import evaluate_generator

__all__ = ["report_run"]


def report_run(run_dir: str | Path, data_root: str | Path, scale: str, experiment: str,
               cache_dir: str | Path | None = None, rows_per_site: int = 2,
               modalities: list[str] | None = None) -> dict[str, Any]:
    """Evaluate the generator of ``run_dir`` on the held-out test cases and draw its pictures.

    ``modalities``: those to evaluate (default: every modality the generator makes, so that an entry added
    to the bank later is reported like the others). ``experiment`` says which modalities each site of the
    figure holds. Writes ``metrics.json`` (per-modality L1 / PSNR / SSIM on test slices),
    ``fig_modalities.png`` (per site: mask, synthetic modalities, the site's real ones, "NA" where it has
    none) and ``loss_curves.png``.
    """
    run_dir = Path(run_dir)
    exp = config.experiment(experiment)
    made = made_modalities(run_dir)
    targets = list(modalities or [m for m in config.MODALITIES if m in made] or exp["targets"])
    generator = load_generator(run_dir)
    # held-out quality on the tumour slices only, where the modalities differ most
    test = SiteDataset(data_root, None, targets, split="test", cache_dir=cache_dir,
                       **slice_settings(scale, background_slices_per_case=0))
    quality = evaluate_generator(generator, test, targets)
    rows = []
    for site, dataset in site_datasets(data_root, experiment, scale, cache_dir=cache_dir).items():
        for k in range(rows_per_site):
            i = (k * len(dataset)) // rows_per_site + len(dataset) // (2 * rows_per_site)
            item = dataset[i]
            reals = {m: item["image"][c] for c, m in enumerate(dataset.modalities)}
            rows.append({"label": item["label"], "brain": item["brain"], "reals": reals,
                         "name": f"{site}\n{dataset.case_ids[int(dataset.slice_case[i])][8:]}"})
    stage = read_info(run_dir).get("stage", "")
    figure = modality_grid(generator, rows, targets, run_dir / "fig_modalities.png",
                           title=f"{stage}: {exp.get('title', experiment)}")
    curves = loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png", title=f"{stage} {experiment}")
    metrics = {"experiment": experiment, "test_cases": len(test.case_ids), "test_slices": len(test),
               "quality": quality, "figure": str(figure), "loss_curves": str(curves)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
