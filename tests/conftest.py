"""Shared fixtures: one small phantom (real MNI anatomy, tiny scale) and one generator pre-trained on
it, for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

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
