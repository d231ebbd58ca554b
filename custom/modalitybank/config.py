"""Presets and experiment definitions, read from the JSON files in ``configs/``.

Figures (case counts, image size, iterations, network width) live in those files, not in
code: every command takes ``--scale NAME`` and looks its numbers up here.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

#: Where the embedded phantom, the default pre-trained generator and the slice cache live
#: (``$MODALITYBANK_HOME``, else ``~/.cache/modalitybank``); the CLI and the federated sites share it.
CACHE_ROOT = Path(os.environ.get("MODALITYBANK_HOME", Path.home() / ".cache" / "modalitybank"))

#: Modality names used throughout the package, in canonical order.
MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
#: File suffix of each modality in the BraTS 2018 layout (``<case>_t1ce.nii.gz`` holds T1c).
MODALITY_SUFFIX: dict[str, str] = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
#: Tumour labels of BraTS: 1 necrosis / non-enhancing core, 2 edema, 4 enhancing tumour.
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
#: The three data centres of BraTS 2018, as the paper splits them.
CENTRES: tuple[str, ...] = ("CBICA", "TCIA", "Other")


@cache
def _load(name: str) -> dict[str, Any]:
    text = resources.files("modalitybank").joinpath("configs", name).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def config_file(name: str) -> dict[str, Any]:
    """``configs/<name>`` (keys starting with ``_`` are documentation and left out)."""
    return json.loads(json.dumps(_load(name)))


def preset(scale: str) -> dict[str, Any]:
    """The size preset ``scale`` (``tiny``, ``small`` or ``paper``) from ``configs/presets.json``."""
    presets = _load("presets.json")
    if scale not in presets:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(presets)}")
    return json.loads(json.dumps(presets[scale]))  # a private copy the caller may edit


def scales() -> list[str]:
    return sorted(_load("presets.json"))


def experiment(name: str) -> dict[str, Any]:
    """The experiment ``name`` (``multimodal``, ``missing_modality``) or ``pretrain`` from ``configs/experiments.json``."""
    experiments = _load("experiments.json")
    if name not in experiments:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(experiments)}")
    return json.loads(json.dumps(experiments[name]))


def experiments() -> list[str]:
    return sorted(k for k in _load("experiments.json") if k not in ("pretrain", "pretrain_sources", "site_centres"))


def pretrain_sources() -> list[str]:
    """Names of the pre-training source sets (``configs/experiments.json`` → ``pretrain_sources``)."""
    return [k for k in _load("experiments.json")["pretrain_sources"] if not k.startswith("_")]


def pretrain_source(name: str = "lgg") -> dict[str, Any]:
    """Pre-training source set ``name`` (``lgg``, ``hgg``, ``nonbrain``): ``grade`` (the folder read),
    ``modality`` (the loader's modality slot), ``base_modality`` (what the pre-trained base makes),
    ``description``. ``lgg`` is the ``pretrain`` entry (the default source)."""
    sources = _load("experiments.json")["pretrain_sources"]
    if name.startswith("_") or name not in sources:
        raise ValueError(f"unknown pre-training source {name!r}; choose one of {pretrain_sources()}")
    out = json.loads(json.dumps(sources[name]))
    out.setdefault("base_modality", out["modality"])
    return out


def centre_of_site(site: str) -> str:
    """The data centre an NVFlare client (``site-1``, ``hospital-a``, ...) holds, from ``experiments.json``."""
    mapping = _load("experiments.json")["site_centres"]
    if site not in mapping:
        raise ValueError(f"site {site!r} is not mapped to a data centre in configs/experiments.json (site_centres)")
    return mapping[site]


def one_of(setting: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` naming ``setting`` and the choices."""
    if value not in choices:
        raise ValueError(f"{setting} must be one of {choices}, not {value!r}")
    return value
