"""A site's own settings, read on the site's side, never sent by the job.

A hospital's IT decides where its data lives and how it takes part; NVFlare's place for that is the
site's startup kit, ``local/``. A site reads ``local/modalitybank_site.json`` there (or the file named
by ``$MODALITYBANK_SITE_CONFIG``), which holds either the site's settings::

    {"data_root": "/data/brats", "cache_dir": "/scratch/modalitybank"}

or, for a simulator workspace whose ``local/`` every simulated site shares, settings per site name
with defaults::

    {"default": {"data_root": "/data/phantom"}, "sites": {"site-2": {"data_root": "/data/other"}}}

Keys a site reads today: ``data_root`` and ``cache_dir`` (they win over the job's arguments of the
same name, which remain for the phantom and the paper's simulations).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "SITE_CONFIG_FILE", "read_site_config"]

SITE_CONFIG_FILE = "modalitybank_site.json"
ENV_VAR = "MODALITYBANK_SITE_CONFIG"


def read_site_config(site: str, local_dir: str | Path | None) -> dict[str, Any]:
    """The settings of ``site``: ``$MODALITYBANK_SITE_CONFIG`` if set, else ``local_dir/modalitybank_site.json``;
    ``{}`` when neither exists. A malformed file raises ``ValueError`` naming it."""
    env = os.environ.get(ENV_VAR)
    path = Path(env) if env else (Path(local_dir) / SITE_CONFIG_FILE if local_dir else None)
    if path is None or not path.is_file():
        if env:
            raise ValueError(f"{ENV_VAR}={env}: no such file")
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    if "sites" in data or "default" in data:
        sites = data.get("sites", {})
        if not isinstance(sites, dict) or not isinstance(data.get("default", {}), dict):
            raise ValueError(f"{path}: 'sites' must map site names to settings, 'default' must be settings")
        return {**data.get("default", {}), **sites.get(site, {})}
    return data
