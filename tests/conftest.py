"""Shared fixtures: one small phantom (real MNI anatomy, tiny scale) and one generator pre-trained on
it, for the whole session.

`make test` runs the suite in two pytest-xdist workers (``-n 2 --dist loadgroup``): each worker then
uses one torch thread, so the two share the machine's cores instead of fighting over them, and the
real POC / provisioned federations (marker ``deploy``) run one after another in one worker, since
each starts a server on the project file's ports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("deploy"):
            item.add_marker(pytest.mark.xdist_group("deploy"))

SMALL_CASES = {"CBICA": 2, "TCIA": 2, "Other": 1, "test": 2, "LGG": 2}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modalitybank.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root, scale="tiny", seed=0, progress=False, cases=SMALL_CASES)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slice_cache")


@pytest.fixture(scope="session")
def pretrained(phantom_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generator pre-trained for 30 iterations on the phantom's LGG-like T1c source set."""
    from modalitybank.training import pretrain

    run = tmp_path_factory.mktemp("pretrain")
    pretrain(run, phantom_root, scale="tiny", cache_dir=cache_dir, progress=False, iterations=30)
    return run
