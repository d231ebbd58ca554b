"""How the federation scales with the number of sites: seconds per iteration in the NVFlare simulator
against the single-process reference, at several site counts, in one command.

Every site holds T1 + T2 + FLAIR and its own folder of the phantom (``modalitybank data split``;
sites share cases when there are more sites than cases, which changes nothing in the timing). The
per-site overhead is the slope of the federated seconds over the number of sites, less the slope of
the reference (a site's own compute: its discriminators and its share of the generator), as a
fraction of the latter.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalitybank import config

__all__ = ["bench_fl_sites"]


def _slope(xs: Sequence[int], ys: Sequence[float]) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def bench_fl_sites(site_counts: Sequence[int] = (3, 6, 12), scale: str = "tiny", iterations: int = 20,
                   workdir: str | Path | None = None, figure: str | Path | None = None,
                   progress: bool = True, poll_interval: float | None = None) -> dict[str, Any]:
    """Seconds per iteration against the number of sites, federated and reference; see the module docstring.
    ``poll_interval``: the job's (``None``: its default, :data:`flare_app.job.POLL_INTERVAL`).

    Returns ``{"sites": {"<n>": federated s/it}, "reference": {"<n>": s/it}, "per_site_overhead": float,
    "per_site_compute": s, "figure": png path, ...}``.
    """
    from modalitybank.bench import reference_iteration
    from modalitybank.data.brats import SiteDataset, slice_settings
    from modalitybank.data.default import CACHE_ROOT, default_phantom, default_pretrained
    from modalitybank.data.sites import split_sites
    from modalitybank.figures import scaling_curve
    from modalitybank.fl.jobs import app, simulate

    warmup = min(3, iterations // 4)
    data, cache = default_phantom(scale), CACHE_ROOT / "slices"
    pretrained = default_pretrained(scale, data_root=data, cache_dir=cache)
    work = Path(workdir or tempfile.mkdtemp(prefix="modalitybank-bench-sites-"))
    federated, reference = {}, {}
    for n in site_counts:
        names = [f"site-{i + 1}" for i in range(n)]
        folders = split_sites(data, work / f"sites-{n}", names, split="train", grades=("HGG",), reuse=True)
        targets = config.experiment("multimodal")["targets"]
        datasets = {s: SiteDataset(f, None, targets, split="all", cache_dir=cache, **slice_settings(scale))
                    for s, f in folders.items()}
        reference[str(n)] = round(reference_iteration(pretrained, targets, {s: targets for s in folders}, datasets,
                                                      scale, iterations, warmup), 4)
        result = simulate("modalitybank_multimodal", work / f"run-{n}", scale=scale, rounds=iterations, clients=names,
                          progress=False, pretrained=str(pretrained), cache_dir=str(cache),
                          site_config=work / f"sites-{n}" / "modalitybank_site.json", poll_interval=poll_interval)
        lines = (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()
        federated[str(n)] = round(statistics.median(json.loads(x)["seconds"] for x in lines[warmup:]), 4)
        if progress:
            print(f"[bench] {n} sites: federated {federated[str(n)]:.3f} s/it, reference {reference[str(n)]:.3f} s/it",
                  flush=True)
    counts = [int(n) for n in federated]
    per_site = _slope(counts, list(reference.values()))
    overhead = (_slope(counts, list(federated.values())) - per_site) / per_site
    png = scaling_curve(counts, list(federated.values()), list(reference.values()),
                        Path(figure) if figure else work / "bench_fl_sites.png")
    return {"sites": federated, "reference": reference, "per_site_overhead": round(overhead, 3),
            "per_site_compute": round(per_site, 4), "scale": scale, "iterations": iterations,
            "poll_interval": poll_interval or app().POLL_INTERVAL, "figure": str(png)}
