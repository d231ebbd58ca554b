"""What a benchmark workdir's stages were computed with, recorded once and checked on every run.

Stages are reused by folder name (``gan/bank-multimodal-lgg-seed0``, ``seg/real_multimodal-seed0``),
and a name does not say which preset, segmentation budget or bundle version made it. Rows computed
with different settings must never end up in one table, so the first run writes
``settings.json`` into the workdir and every later run compares: a difference (a changed preset, a
new ``tumor_segmentation`` bundle version, another ``--data``) is refused with the keys that differ,
and nothing in the workdir is touched. Rows, seeds and privacy modes are not settings: they have
stages of their own and share a workdir freely.

After a change of settings a user may keep the stages that do not depend on it (the real rows do not
depend on the generator's preset): remove those that do, and ``--adopt-workdir`` records the new
settings; the old record is kept beside it as ``settings.<n>.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

from modalitybank import config
from modalitybank.bank import atomic_write_json
from modalitybank.benchmark.plan import Budget

__all__ = ["SETTINGS_FILE", "WorkdirSettingsError", "check_settings", "settings_of"]

SETTINGS_FILE = "settings.json"


class WorkdirSettingsError(ValueError):
    """A workdir holds stages computed with other settings than this run's."""


def _bundle_version(name: str) -> str:
    from modalitybank.resources import bundle_dir

    return json.loads((bundle_dir(name) / "configs" / "metadata.json").read_text())["version"]


def settings_of(scale: str, data: Path | None, test_data: Path | None,
                gan_iterations: int | None) -> dict[str, Any]:
    """The settings every stage of a run depends on (JSON-serialisable)."""
    return {
        "scale": scale,
        "preset": config.preset(scale),
        "segmentation_budget": dataclasses.asdict(Budget.of(scale)),
        "bundles": {name: _bundle_version(name) for name in ("tumor_segmentation", "site_discriminator")},
        "experiments": {name: config.experiment(name) for name in config.experiments()},
        "data": str(data) if data is not None else "phantom",
        "test_data": str(test_data) if test_data is not None else None,
        "gan_iterations": gan_iterations,
    }


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if old == new else [f"{key}: {json.dumps(old)} -> {json.dumps(new)}"]


def check_settings(workdir: Path, settings: dict[str, Any], adopt: bool = False) -> None:
    """Record ``settings`` in a new ``workdir``, or check them against the recorded ones.

    Raises :class:`WorkdirSettingsError` if the recorded settings differ, or if the workdir holds
    stages but no record (made before settings were recorded), unless ``adopt``, which records
    ``settings`` for them (a differing record moves to ``settings.<n>.json``): say so only when every
    stage left in the workdir was computed with these settings or does not depend on what changed.
    """
    path = workdir / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        diff = _differences(recorded, settings)
        if diff and not adopt:
            raise WorkdirSettingsError(
                f"{workdir} holds stages computed with other settings than this run's (recorded -> now: "
                + "; ".join(diff) + f"; see {path}). Use a new --workdir, or remove the stages that depend on them "
                "and rerun with --adopt-workdir, which records this run's settings (the old record is kept).")
        if diff:
            kept = next(p for n in itertools.count(1) if not (p := workdir / f"settings.{n}.json").exists())
            path.replace(kept)
            atomic_write_json(settings, path)
        return
    stages = [p.parent.relative_to(workdir) for p in workdir.glob("**/stage.json")]
    if stages and not adopt:
        raise WorkdirSettingsError(
            f"{workdir} holds {len(stages)} stages (e.g. {stages[0]}) but no {SETTINGS_FILE}: they were made by an "
            "earlier version, with settings unknown. Use a new --workdir, or --adopt-workdir if you know they were "
            "computed with exactly this run's preset, budget and bundle versions.")
    atomic_write_json(settings, path)
