"""Prototype: does instance norm over the whole slice make the generator's intensity depend on brain area?
usage: python tools/norm_area_experiment.py instance|masked train|eval  (writes runs/norm_area/<variant>; ~6 min to train on 2 cores)

Finding (2026-12-03): with instance norm over the whole 64x64 slice, the pre-trained generator makes
peripheral slices darker than real; statistics taken inside the brain only halve that bias.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
variant, what = sys.argv[1], sys.argv[2]
import modalitybank.networks as nets  # noqa: E402  (patched before anything builds a generator)


class MaskedInstanceNorm(nn.Module):
    mask = None  # (N,1,H,W) set by the generator's pre-hook
    def __init__(self, channels, **kw):
        super().__init__()
    def forward(self, h):
        w = F.interpolate(MaskedInstanceNorm.mask, size=h.shape[2:], mode="area")
        s = w.sum(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        mean = (w * h).sum(dim=(2, 3), keepdim=True) / s
        var = (w * (h - mean) ** 2).sum(dim=(2, 3), keepdim=True) / s
        return (h - mean) / torch.sqrt(var + 1e-5)

if variant == "masked":
    class _Fac:
        INSTANCE = "instance"
        def __getitem__(self, key):
            return MaskedInstanceNorm
    nets.Norm = _Fac()
    orig_init = nets.ResnetGenerator.__init__
    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.register_forward_pre_hook(lambda mod, args: setattr(MaskedInstanceNorm, "mask", args[0][:, 4:5]))
    nets.ResnetGenerator.__init__ = init

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
    from modalitybank import config
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
