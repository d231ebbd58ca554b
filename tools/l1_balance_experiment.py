"""Does a region-balanced L1 term teach the bank the tumour's inner contrast faster?

usage: python tools/l1_balance_experiment.py WORKDIR BALANCE [ITERATIONS]
(writes WORKDIR/experiments/l1_balance/b<BALANCE>-it<ITERATIONS>; ~2.5 s per iteration on 2 cores)

WORKDIR is a ``modalitybank benchmark --scale small`` workdir: its ``data/`` and its LGG pre-training
``pretrain/lgg`` are used. The bank of Table II (T1c + T2 + FLAIR, each centre lacking one) is learned
single-process (:func:`modalitybank.training.train_bank`, the federated run's reference, the same GAN
step) with the train setting ``l1_balance = BALANCE`` (``GanLoss.l1_balance``; 0 is the paper's L1).
Then, on the held-out test cases' tumour slices, it prints per modality and label the mean of the
synthetic image against the real one (images in [-1, 1]), the contrast ratio ``(label - healthy)_synthetic / (label - healthy)_real`` (1 is
the real contrast, 0 a flat tumour) and the held-out PSNR. Run it for two BALANCE values side by side.
"""
import json
import sys
from pathlib import Path

import torch

from modalitybank import config, training
from modalitybank.data.brats import SiteDataset, slice_settings
from modalitybank.networks import mask_channels
from modalitybank.store import load_generator
from modalitybank.synthesis import evaluate_generator

LABELS = {0: "healthy", 2: "edema", 1: "necrosis", 4: "enhancing"}

workdir, balance = Path(sys.argv[1]), float(sys.argv[2])
iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 250
run = workdir / "experiments" / "l1_balance" / f"b{balance:g}-it{iterations}"
torch.set_num_threads(2)
summary = training.train_bank(run, workdir / "data", workdir / "pretrain" / "lgg", scale="small",
                              experiment="missing_modality", cache_dir=workdir / "cache", progress=True,
                              iterations=iterations, l1_balance=balance)

generator = load_generator(run)
generator.eval()
targets = config.experiment("missing_modality")["targets"]
test = SiteDataset(workdir / "data", None, targets, split="test", cache_dir=workdir / "cache",
                   **slice_settings("small", background_slices_per_case=0))
result = {"balance": balance, "iterations": iterations, "seconds": summary["seconds"], "modalities": {}}
with torch.no_grad():
    fake = {m: generator.generate(mask_channels(test.labels, test.brains), [m])[m][:, 0] for m in targets}
brain = test.brains > 0
for i, m in enumerate(targets):
    real = test.images[:, i]
    means = {}
    for value, name in LABELS.items():
        where = brain & (test.labels == value)
        means[name] = (float(fake[m][where].mean()), float(real[where].mean()))
    ratio = {name: round((f - means["healthy"][0]) / (r - means["healthy"][1]), 3)
             for name, (f, r) in means.items() if name != "healthy"}
    result["modalities"][m] = {"mean": {k: [round(f, 3), round(r, 3)] for k, (f, r) in means.items()},
                               "contrast_ratio": ratio}
for m, q in evaluate_generator(generator, test, targets).items():
    result["modalities"][m]["psnr"] = q["psnr"]
    print(f"b={balance:g} {m:6s} PSNR {q['psnr']:.2f}  contrast ratio "
          + "  ".join(f"{k} {v:+.2f}" for k, v in result["modalities"][m]["contrast_ratio"].items()))
(run / "contrast.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result))
