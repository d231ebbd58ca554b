"""An append-only record of every message, so that a hospital can audit exactly what left it.

One JSON line per key of each message: iteration, site, direction (``sent``/``received``, as seen
by the writer), key, shape, dtype, bytes and whether it passed the privacy guard.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from modalitybank.fl.wire import describe

__all__ = ["Ledger"]


class Ledger:
    """JSON-lines ledger at ``path`` (appended to, never rewritten)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, site: str, direction: str, task: str, data: dict[str, Any], iteration: int | None = None,
               status: str = "passed", note: str = "", extra: dict[str, Any] | None = None) -> None:
        """One line per key of ``data``; ``extra`` (e.g. the serialised message size) goes on each line."""
        now = round(time.time(), 3)
        lines = [json.dumps({"time": now, "iteration": iteration, "site": site, "direction": direction, "task": task,
                             **entry, "status": status, **({"note": note} if note else {}), **(extra or {})})
                 for entry in describe(data)] or [json.dumps({"time": now, "iteration": iteration, "site": site,
                                                              "direction": direction, "task": task, "key": None,
                                                              "status": status, "note": note})]
        with self._lock, open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
