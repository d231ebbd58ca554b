"""Does the generator's intensity depend on how much of the frame the brain covers? Whole-slice
instance norm (``instance``) against brain-masked instance norm (``brain``, the preset default since
generator bundle 0.3.0).

usage: python tools/norm_area_experiment.py instance|brain train|eval
(writes runs/norm_area/<variant>; ~6 min to train on 2 cores)

``train`` pre-trains the generator on the LGG-like T1c source at ``small`` with the preset's
``model.norm`` set to the variant; ``eval`` synthesises the HGG test cases' T1c and prints the mean
error (fake - real, z of the volume) by brain-area bin (a slice's brain area over the case's largest).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
variant, what = sys.argv[1], sys.argv[2]
import modalitybank.config as config  # noqa: E402

if variant not in ("instance", "brain"):
    raise SystemExit(f"variant must be instance or brain, not {variant!r}")
_preset = config.preset


def preset_with_norm(scale: str) -> dict:
    p = _preset(scale)
    p["model"]["norm"] = variant
    return p


config.preset = preset_with_norm  # the generator is built from the preset's model section

from modalitybank.data.default import default_phantom  # noqa: E402


def zscore(v, brain):
    return (v - v[brain].mean()) / v[brain].std()


data = default_phantom("small")
run = Path("runs/norm_area") / variant  # relative to where it is run (the README: the repository root)
if what == "train":
    from modalitybank.training import pretrain
    t = time.time()
    out = pretrain(run, data, scale="small", progress=False)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, (dict, list))}), time.time() - t)
else:
    from modalitybank.data.brats import load_case, scan_cases, split_cases
    from modalitybank.store import load_generator
    from modalitybank.synthesis import synthesize_volume
    g = load_generator(run)
    size = config.preset("small")["slices"]["image_size"]
    recs = split_cases(scan_cases(data, ("HGG",)), Path(data), "test")
    rows = []
    for r in recs:
        images, seg, _ = load_case(r, ["t1c"])
        brain = images["t1c"] > 0
        fake = synthesize_volume(g, seg, brain, ["t1c"], size)["t1c"].astype(np.float64)
        real = images["t1c"].astype(np.float64)
        fz, rz = (zscore(v, brain) for v in (fake, real))
        area = brain.sum(axis=(0, 1))
        amax = area.max()
        for k in np.flatnonzero(area):
            b = brain[:, :, k]
            rows.append((area[k] / amax, (fz[:, :, k][b] - rz[:, :, k][b]).mean(), np.abs(fz[:, :, k][b] - rz[:, :, k][b]).mean(), fz[:,:,k][b].mean(), rz[:,:,k][b].mean()))
    a = np.array(rows)
    for lo, hi in [(0, .1), (.1, .25), (.25, .5), (.5, .75), (.75, 1.01)]:
        s = a[(a[:, 0] >= lo) & (a[:, 0] < hi)]
        print(f"{variant} area {lo:.2f}-{hi:.2f} n={len(s):4d} bias(fake-real) {s[:,1].mean():+.3f} mae {s[:,2].mean():.3f} fake {s[:,3].mean():+.3f} real {s[:,4].mean():+.3f}")
    per = a[a[:, 0] < .5]
    cen = a[a[:, 0] >= .5]
    print(f"{variant} peripheral-minus-central bias {per[:,1].mean()-cen[:,1].mean():+.3f} z")
