"""Build hook: a wheel of ``modalitybank`` carries the folders beside the package.

``bundles/`` (the MONAI bundles), ``jobs/`` (the NVFlare jobs and project file) and ``flare_app/``
(the job script) are copied into ``modalitybank/_share/`` of the build, where
:func:`modalitybank.resources.shared_dir` finds them after ``pip install .``. Everything else is
in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHARED = ("bundles", "jobs", "flare_app")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "eval", "runs", "*.ts")  # run outputs stay behind


class BuildWithShared(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the folders of the source tree
            return
        root = Path(__file__).resolve().parent
        share = Path(self.build_lib) / "modalitybank" / "_share"
        for name in SHARED:
            target = share / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(root / name, target, ignore=IGNORE)


setup(cmdclass={"build_py": BuildWithShared})
