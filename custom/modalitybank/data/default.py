"""The embedded default data set and pre-trained generator, made on first use and shared.

Several processes (the simulator's sites and server) may ask for them at once: a file lock makes
one of them build while the others wait, and all then read the same folder.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modalitybank.config import CACHE_ROOT

__all__ = ["CACHE_ROOT", "default_phantom", "default_pretrained", "locked"]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _once(path: Path, done: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    if done(path):
        return path
    with locked(path):
        if not done(path):
            build(path)
    return path


def default_phantom(scale: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """The phantom of ``scale``/``seed`` (built if missing) at ``root`` or in the shared cache."""
    from modalitybank.data.phantom import make_phantom

    path = Path(root) if root else CACHE_ROOT / "phantom" / f"{scale}-seed{seed}"

    def done(p: Path) -> bool:
        info = p / "dataset.json"
        return info.is_file() and json.loads(info.read_text()).get("complete", False)

    return _once(path, done, lambda p: make_phantom(p, scale=scale, seed=seed, progress=False))


def default_pretrained(scale: str, seed: int = 0, data_root: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """A generator pre-trained on the public source set of the phantom (built if missing)."""
    from modalitybank.training import pretrain

    path = CACHE_ROOT / "pretrained" / f"{scale}-seed{seed}"
    data = Path(data_root) if data_root else default_phantom(scale, seed)
    return _once(path, _finished, lambda p: pretrain(p, data, scale=scale, cache_dir=cache_dir, progress=False, seed=seed))


def _finished(run_dir: Path) -> bool:
    import torch

    state = run_dir / "state.pt"
    if not state.is_file():
        return False
    blob = torch.load(state, map_location="cpu", weights_only=False)
    return blob["iteration"] >= blob["settings"]["iterations"]
