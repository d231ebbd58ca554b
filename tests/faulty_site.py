"""A site that misbehaves on purpose, so that the guards can be seen working (tests only).

The Job API carries this module in the job's ``custom/`` folder (it is not part of the package),
so the production executor holds no fault hooks.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from nvflare.apis.signal import Signal

from modalitybank.fl import wire
from modalitybank.fl.executor import SiteExecutor
from modalitybank.gan import SiteBatch


class FaultySiteExecutor(SiteExecutor):
    """:class:`SiteExecutor` with faults by site name: ``{"site-2": {"leak_real": true}}``.

    Kinds: ``leak_real`` (adds a real image to the result), ``nan_from: k`` / ``huge_from: k``
    (NaN / 1e6-times gradients from iteration k), ``hang_at: k`` with ``hang_seconds: s``.
    """

    def __init__(self, *args: Any, faults: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # *args and **kwargs: NVFlare's Job API then writes the base's arguments too
        self.faults = faults or {}

    def before_reply(self, iteration: int, out: dict[str, Any], batch: SiteBatch, abort_signal: Signal) -> None:
        f = self.faults.get(self.site, {})
        if f.get("leak_real"):
            m = self.modalities[0]
            out[f"real/{m}"] = wire.to_wire(batch.reals[m], "float32")
        if "nan_from" in f and iteration >= f["nan_from"]:
            for k in out:
                out[k] = np.full_like(out[k], np.nan)
        if "huge_from" in f and iteration >= f["huge_from"]:
            for k in out:
                out[k] = (out[k] * 1e6).astype(out[k].dtype)
        if f.get("hang_at") == iteration:
            end = time.time() + float(f.get("hang_seconds", 10))
            while time.time() < end and not abort_signal.triggered:
                time.sleep(0.1)
