"""Stages computed once in the benchmark's workdir, resumed after an interruption, timed.

A stage is a folder under the workdir with a ``stage.json`` written (atomically) when it finished:
its result and wall time. A stage whose folder lacks it is run (again); the functions it calls
resume their own partial work (GAN checkpoints, the phantom's finished cases). One line per stage
goes to stderr with the elapsed time and an ETA from the stages already timed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modalitybank.bank import atomic_write_json

__all__ = ["STAGE_FILE", "Stages"]

STAGE_FILE = "stage.json"
#: Rough relative cost of each kind of stage, for the ETA before any stage of that kind was timed.
_COST = {"data": 1.0, "pretrain": 4.0, "gan": 36.0, "synth": 1.0, "seg": 4.0, "fedavg": 13.0, "eval": 0.3}  # small, 2 cores


class Stages:
    """Run the benchmark's stages in ``workdir``; ``plan`` is the list of ``(kind, name)`` expected."""

    def __init__(self, workdir: Path, planned: list[tuple[str, str]], progress: bool = True) -> None:
        self.workdir = workdir
        self.planned = planned
        self.progress = progress
        self.times: dict[str, dict[str, Any]] = {}
        self.t0 = time.perf_counter()
        #: stages other runs finished in the workdir (other tables, rows, variants): their times feed the ETA
        self.earlier: dict[str, dict[str, Any]] = {}
        for marker in [*workdir.glob(f"*/{STAGE_FILE}"), *workdir.glob(f"*/*/{STAGE_FILE}")]:
            try:
                done = json.loads(marker.read_text())
                self.earlier[done["name"]] = {"kind": done["kind"], "seconds": float(done["seconds"])}
            except (ValueError, KeyError, OSError):
                continue  # an unreadable marker only costs the ETA its figure

    def path(self, name: str) -> Path:
        return self.workdir / name

    def done(self, name: str) -> dict[str, Any] | None:
        marker = self.path(name) / STAGE_FILE
        return json.loads(marker.read_text()) if marker.is_file() else None

    def run(self, kind: str, name: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """``fn(folder)`` once: its result is stored in ``folder/stage.json`` and read back on a rerun."""
        previous = self.done(name)
        if previous is not None:
            if name not in self.times:  # a stage this run computed and asks for again (a Completed row) stays its own
                self.times[name] = {"kind": kind, "seconds": previous["seconds"], "reused": True}
                self._say(f"{kind:8s} {name}: done before ({previous['seconds']:.0f} s), reused")
            return previous["result"]
        self._say(f"{kind:8s} {name} ...")
        folder = self.path(name)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = fn(folder)
        seconds = round(time.perf_counter() - start, 1)
        atomic_write_json({"kind": kind, "name": name, "seconds": seconds, "result": result}, folder / STAGE_FILE)
        self.times[name] = {"kind": kind, "seconds": seconds, "reused": False}
        self._say(f"{kind:8s} {name}: {seconds:.0f} s")
        return result

    def eta(self) -> float:
        """Seconds the stages not yet run should take: for each kind, the mean time of its stages timed so far
        (every stage finished in the workdir, by any run), else the relative cost of the kind scaled by the time per unit
        of cost seen so far; NaN before any stage was timed."""
        left = [k for k, n in self.planned if n not in self.times and self.done(n) is None]
        timed = list(({**self.earlier, **self.times}).values())
        by_kind: dict[str, list[float]] = {}
        for t in timed:
            by_kind.setdefault(t["kind"], []).append(t["seconds"])
        per_unit = sum(t["seconds"] for t in timed) / sum(_COST[t["kind"]] for t in timed) if timed else float("nan")
        return sum(sum(by_kind[k]) / len(by_kind[k]) if k in by_kind else per_unit * _COST[k] for k in left)

    def _say(self, text: str) -> None:
        if not self.progress:
            return
        finished = sum(1 for _, n in self.planned if n in self.times)
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        eta_text = f"ETA {eta / 60:.0f} min" if eta == eta else "ETA ?"
        print(f"[benchmark {finished}/{len(self.planned)} | {elapsed / 60:.1f} min | {eta_text}] {text}",
              file=sys.stderr, flush=True)

    def summary(self) -> dict[str, dict[str, Any]]:
        """The wall time of every stage (``reused``: computed by an earlier run)."""
        return dict(self.times)
