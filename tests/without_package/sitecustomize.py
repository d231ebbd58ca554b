"""Run at start-up by every Python process whose PYTHONPATH holds this folder (tests only): the
``modalitybank`` of this repository (installed editable, i.e. its ``custom/`` folder on
``sys.path``) disappears, as on a hospital that does not have the package. A job that carries its
code in ``custom/`` must then run from that code alone. (NVFlare starts job processes with
``PYTHONPATH`` = its own ``sys.path``, so this folder reaches them too.)"""

import sys
from pathlib import Path

_installed = (Path(__file__).resolve().parents[2] / "custom").resolve()
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _installed]
