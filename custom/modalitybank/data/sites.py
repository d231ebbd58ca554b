"""One BraTS-layout folder split into N hospital sites, for simulations with any number of sites.

Each site gets a folder of its own in the BraTS layout (``<out>/<site>/<grade>/<case>``, links to the
case folders, nothing copied) and ``<out>/modalitybank_site.json`` names each site's folder in the
form a simulator workspace's ``local/`` takes (:mod:`modalitybank.fl.site_config`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modalitybank.data.brats_cases import scan_cases, split_cases

__all__ = ["split_sites"]


def split_sites(root: str | os.PathLike[str], out: str | os.PathLike[str], sites: int | Sequence[str],
                split: str = "train", seed: int = 0, grades: Sequence[str] = ("HGG", "LGG"),
                reuse: bool = False) -> dict[str, Path]:
    """Deal the cases of ``split`` (``train`` keeps the test cases out of every site) of ``root`` to ``sites``.

    Args:
        root: a BraTS-layout folder (``HGG/`` and/or ``LGG/``).
        out: where the site folders go (replaced site by site).
        sites: a number (names ``site-1..N``, the simulator's) or the site names.
        split: ``train``, ``test`` or ``all`` (``splits.json`` of ``root`` decides, as for the loader).
        seed: the shuffle before the cases are dealt round-robin.
        grades: the grade folders to deal (those present; the phantom's LGG folder is the T1c-only
            pre-training source, so its simulations take ``("HGG",)``).
        reuse: with fewer cases than sites, deal the cases round and round so that every site gets
            one (sites then share cases: for benchmarks of the federation, not for experiments).

    Returns ``{site: folder}``; ``out/modalitybank_site.json`` maps every site to its folder.
    """
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    names = [f"site-{i + 1}" for i in range(sites)] if isinstance(sites, int) else list(sites)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"site names must be distinct and at least one: {names}")
    grades = [g for g in grades if (root / g).is_dir()]
    records = split_cases(scan_cases(root, grades), root, split, seed=seed)
    if len(records) < len(names) and not reuse:
        raise ValueError(f"{root}: {len(records)} {split} case(s) for {len(names)} sites")
    order = np.random.default_rng(seed).permutation(len(records))
    order = np.resize(order, max(len(records), len(names)))  # reuse: round and round
    folders = {}
    for i, name in enumerate(names):
        site = out / name
        for rec in (records[j] for j in order[i::len(names)]):
            link = site / rec.grade / rec.case_id
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(rec.folder, target_is_directory=True)
        folders[name] = site
    (out / "modalitybank_site.json").write_text(json.dumps(
        {"sites": {name: {"data_root": str(path)} for name, path in folders.items()}}, indent=2) + "\n")
    return folders
