"""Where the project's folders beside the package are: ``bundles/``, ``jobs/``, ``flare_app/``.

A wheel (``pip install .``) carries a copy of them inside the package (``modalitybank/_share``,
written by ``setup.py`` at build time); an editable install or a source checkout uses the
folders of the repository itself. A job that carries the package in its ``custom/`` folder (NVFlare
``with_code``) carries the bundles it needs beside it (``custom/<bundle>``): :func:`bundle_dir` finds
them there when no installed copy exists.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundle_dir", "shared_dir"]

_PACKAGE = Path(__file__).resolve().parent
#: The names :func:`shared_dir` knows, and that the wheel carries.
SHARED = ("bundles", "jobs", "flare_app")


def shared_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`SHARED`): the installed copy, else the source tree's."""
    if name not in SHARED:
        raise ValueError(f"unknown shared folder {name!r}; choose one of {SHARED}")
    for candidate in (_PACKAGE / "_share" / name, _PACKAGE.parents[1] / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ is neither installed with the package ({_PACKAGE / '_share'}) nor "
                            f"beside its source ({_PACKAGE.parents[1]}); reinstall modalitybank")


def bundle_dir(name: str) -> Path:
    """The MONAI bundle ``name`` (``modalitybank_generator``, ``site_discriminator``, ``tumor_segmentation``):
    installed with the package or in its source tree, else carried beside the package (a job's ``custom/``)."""
    try:
        path = shared_dir("bundles") / name
    except FileNotFoundError:
        path = _PACKAGE.parent / name
        if (path / "configs" / "metadata.json").is_file():
            return path
        raise
    if not (path / "configs" / "metadata.json").is_file():
        carried = _PACKAGE.parent / name
        if (carried / "configs" / "metadata.json").is_file():
            return carried
        raise FileNotFoundError(f"no bundle {name!r} in {path.parent}")
    return path
