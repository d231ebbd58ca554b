"""A site's own settings, read on the site's side, never sent by the job.

A hospital's IT decides where its data lives and how it takes part; NVFlare's place for that is the
site's startup kit, ``local/``. A site reads ``local/modalitybank_site.json`` there (or the file named
by ``$MODALITYBANK_SITE_CONFIG``), which holds either the site's settings::

    {"data_root": "/data/brats", "cache_dir": "/scratch/modalitybank"}

or, for a simulator workspace whose ``local/`` every simulated site shares, settings per site name
with defaults::

    {"default": {"data_root": "/data/phantom"}, "sites": {"site-2": {"data_root": "/data/other"}}}

Keys a site reads today: ``data_root`` and ``cache_dir`` (they win over the job's arguments of the
same name, which remain for the phantom and the paper's simulations), ``file_names``, ``privacy``
(:mod:`modalitybank.dp`) and ``state_dir``: where the site keeps what must outlive a job and a restart
(its discriminators' checkpoint, the privacy budget it spent in mode ``dp``), in ``<state_dir>/<site>/``;
default: the site's workspace root, which a POC or provisioned site keeps but NVFlare's simulator wipes
on every start (so :func:`modalitybank.fl.jobs.simulate` sets it outside the simulator's workspace).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "SITE_CONFIG_FILE", "load_site_config", "read_site_config", "site_state_dir", "with_state_dir"]

SITE_CONFIG_FILE = "modalitybank_site.json"
ENV_VAR = "MODALITYBANK_SITE_CONFIG"


def load_site_config(path: str | Path) -> dict[str, Any]:
    """A settings file as it is written (either form); a malformed one raises ``ValueError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return data


def read_site_config(site: str, local_dir: str | Path | None) -> dict[str, Any]:
    """The settings of ``site``: ``$MODALITYBANK_SITE_CONFIG`` if set, else ``local_dir/modalitybank_site.json``;
    ``{}`` when neither exists. A malformed file raises ``ValueError`` naming it."""
    env = os.environ.get(ENV_VAR)
    path = Path(env) if env else (Path(local_dir) / SITE_CONFIG_FILE if local_dir else None)
    if path is None or not path.is_file():
        if env:
            raise ValueError(f"{ENV_VAR}={env}: no such file")
        return {}
    data = load_site_config(path)
    if "sites" in data or "default" in data:
        sites = data.get("sites", {})
        if not isinstance(sites, dict) or not isinstance(data.get("default", {}), dict):
            raise ValueError(f"{path}: 'sites' must map site names to settings, 'default' must be settings")
        return {**data.get("default", {}), **sites.get(site, {})}
    return data


def site_state_dir(site: str, own: dict[str, Any], workspace_root: str | Path) -> Path:
    """Where ``site`` keeps its state across jobs and restarts: ``<state_dir>/<site>`` if its own settings
    ``own`` name a ``state_dir``, else its workspace root."""
    return Path(own["state_dir"]) / site if own.get("state_dir") else Path(workspace_root)


def with_state_dir(settings: dict[str, Any] | None, state_dir: str | Path) -> dict[str, Any]:
    """A per-site settings file (``{"default": ..., "sites": ...}``) from ``settings`` (either form, or
    ``None``) whose default ``state_dir`` is ``state_dir`` unless the settings name one."""
    settings = dict(settings or {})
    if "sites" not in settings and "default" not in settings:
        settings = {"default": settings} if settings else {}
    default = dict(settings.get("default", {}))
    default.setdefault("state_dir", str(state_dir))
    return {**settings, "default": default}
