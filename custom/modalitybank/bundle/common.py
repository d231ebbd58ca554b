"""What every bundle needs: the default ``bundle_root``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

_CONFIG_FLAGS = ("--config_file", "--meta_file")

def locate_bundle_root(default: str = ".") -> str:
    """The bundle folder of the config file named on the command line, else ``default``.

    ``python -m monai.bundle run --config_file bundles/x/configs/train.json`` gives ``bundles/x``,
    so a bundle run from any working directory writes into its own ``models/`` and ``eval/``.
    Without such an argument (a config loaded from Python) it is ``default`` — ``"."``, the model
    zoo's convention. ``--bundle_root DIR`` on the command line overrides the key altogether.
    """
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag not in _CONFIG_FLAGS:
            continue
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        # fire accepts a list such as "['a/configs/train.json','a/configs/evaluate.json']"
        first = re.split(r"[\[\],'\"\s]+", value.strip())
        first = [f for f in first if f]
        if first:
            configs = Path(first[0]).resolve().parent
            return str(configs.parent if configs.name == "configs" else configs)
    return default
