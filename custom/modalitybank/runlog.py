"""The run log of a GAN run: one JSON line per iteration in ``metrics.jsonl``.

Used by the single-process reference loop (:func:`modalitybank.training.run_gan`) and by the
federated controller, so both write the same lines: ``{"iteration", "losses": {"<site>/<modality>":
{...}}, "mean": {"d", "g_adv", "g_l1"}}`` plus whatever the caller adds (``seconds``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LOSS_KEYS", "RunLog", "mean_losses", "truncate_log"]

#: The losses a log line averages over sites and modalities.
LOSS_KEYS = ("d", "g_adv", "g_l1")


def mean_losses(report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean of each of :data:`LOSS_KEYS` over the ``"<site>/<modality>"`` entries that report it (a site's
    privacy mode may hold losses back); NaN when none does."""
    out = {}
    for k in LOSS_KEYS:
        values = [r[k] for r in report.values() if k in r]
        out[k] = sum(values) / len(values) if values else float("nan")
    return out


def truncate_log(path: Path, last_iteration: int) -> None:
    """Drop the log lines of iterations after ``last_iteration`` (redone after a resume)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= last_iteration]
        path.write_text("".join(line + "\n" for line in kept))


class RunLog:
    """``metrics.jsonl`` in ``run_dir``, cut back to ``start`` (a resumed run redoes what followed).

    Example::

        with RunLog(run_dir, start) as log:
            mean = log.write(iteration + 1, report, seconds=0.4)
    """

    def __init__(self, run_dir: str | Path, start: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        truncate_log(self.path, start)
        self._file = open(self.path, "a")  # noqa: SIM115  (closed by close / __exit__)

    def write(self, iteration: int, report: Mapping[str, Mapping[str, float]], **extra: Any) -> dict[str, float]:
        """Append the line of ``iteration`` (1-based) and return its mean losses."""
        mean = mean_losses(report)
        self._file.write(json.dumps({"iteration": iteration, "losses": report, "mean": mean, **extra}) + "\n")
        self._file.flush()
        return mean

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
