"""Jobs: made by the app (``flare_app/job.py``), found by name, run in the NVFlare simulator.

The folders in ``jobs/`` are what ``flare_app/job.py`` exports (configuration only; the sites have
the package installed) and run as they are: ``nvflare simulator jobs/<name> -w WS -n 3 -t 3``.
:func:`export_job` makes a job with other component arguments (scale, iterations, data location,
...) or carrying its code (``with_code``) through the same job script, so nothing is edited by hand.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from modalitybank.fl import wire
from modalitybank.fl.policy import admit_package
from modalitybank.fl.processes import nvflare_command
from modalitybank.fl.site_config import SITE_CONFIG_FILE, load_site_config, with_state_dir
from modalitybank.resources import shared_dir

__all__ = ["app", "export_job", "find_job", "read_run", "simulate"]


@cache
def app() -> ModuleType:
    """The job script ``flare_app/job.py`` (of the source tree, or installed with the package)."""
    path = shared_dir("flare_app") / "job.py"
    spec = importlib.util.spec_from_file_location("modalitybank_flare_app", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def find_job(job: str | Path) -> Path:
    """A job folder given as a path, or by name in ``jobs/``."""
    path = Path(job)
    if (path / "meta.json").is_file():
        return path.resolve()
    jobs = shared_dir("jobs")
    named = jobs / str(job)
    if (named / "meta.json").is_file():
        return named
    known = sorted(p.name for p in jobs.glob("*") if (p / "meta.json").is_file())
    raise FileNotFoundError(f"no job {job!r}: not a job folder, and not one of {known} in {jobs}")


def export_job(job: str | Path, out_dir: str | Path, with_code: bool = False, **args: Any) -> Path:
    """The job ``job`` in ``out_dir`` (replaced), ready to run or submit.

    A job of the app (a name, or the committed folder of one) is made by ``flare_app/job.py``
    with component arguments ``args`` (``scale``, ``rounds``, ``data_root``, ``pretrained``, ...;
    ``None`` keeps the default); any other job folder is copied as it is.
    """
    out, path = Path(out_dir), Path(job)
    args = {k: v for k, v in args.items() if v is not None}
    folder = (path / "meta.json").is_file()
    name = path.name if folder else str(job)
    if out.exists():
        shutil.rmtree(out)
    if name in app().JOBS and (not folder or path.resolve() == find_job(name)):
        app().make_job(name, with_code=with_code, **args).export_job(str(out.parent))
        if out.name != name:
            (out.parent / name).rename(out)
        return out
    if args or with_code:
        raise ValueError(f"{job}: not a job of the app ({sorted(app().JOBS)}); it runs as it is, without "
                         f"arguments {sorted(args)}{' or carried code' if with_code else ''}")
    shutil.copytree(find_job(job), out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def read_run(checkpoint: str | Path) -> dict[str, Any] | None:
    """What a GAN run trained (``run.json`` in its checkpoint folder), or ``None`` if it wrote none."""
    path = Path(checkpoint) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def simulate(job: str | Path, workdir: str | Path, scale: str = "tiny", rounds: int | None = None,
             n_clients: int = 3, threads: int | None = None, clients: list[str] | None = None,
             progress: bool = True, with_code: bool = False, site_config: str | Path | None = None,
             **args: Any) -> dict[str, Any]:
    """Run ``job`` in the NVFlare simulator inside ``workdir``; a second run there resumes.

    ``workdir/checkpoint`` holds the generator (stable across runs, so a restarted server
    resumes from it), ``workdir/sites/<site>`` what each site keeps across restarts (its discriminators,
    the privacy budget it spent), ``workdir/workspace`` the simulator's workspace (wiped by the simulator
    on every start; the sites' ledgers of the last run), ``workdir/simulator.log`` the log. ``site_config`` (a ``modalitybank_site.json``,
    e.g. from ``modalitybank data split``) goes into the workspace's ``local/``, where every simulated
    site reads its own settings. ``clients`` names the sites (default ``site-1..n_clients``). Raises ``RuntimeError`` naming the reason
    if the simulator fails, which includes a run in which too few sites joined or none trained.

    Returns ``{"checkpoint", "ledgers", "rounds", "sites", "seconds", "log", "workspace"}``: ``rounds``
    counts the iterations with accepted gradients, ``sites`` the sites that contributed (GAN jobs; ``None``
    and ``[]`` for the FedAvg jobs, whose results :func:`modalitybank.fl.segmentation.run_fedavg` reads
    from the workspace).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint"
    gan = str(job) in app().JOBS and app().JOBS[str(job)]["kind"] == "gan"
    extra = {"checkpoint_dir": str(checkpoint)} if gan else {}
    job_dir = export_job(job, workdir / "job" / Path(job).name, with_code=with_code, scale=scale, rounds=rounds,
                         **extra, **args)
    workspace = workdir / "workspace"
    admit_package(workspace / "local")  # the simulated sites' allow-list (nvflare simulator copies local/ to each)
    # the sites' own settings (data folders, ...), read on their side; their state (discriminators, privacy
    # budget spent) kept in workdir/sites/<site>, since the simulator wipes its workspace on every start
    own = load_site_config(site_config) if site_config is not None else None
    (workspace / "local" / SITE_CONFIG_FILE).write_text(json.dumps(with_state_dir(own, workdir / "sites"), indent=1))
    n_sites = len(clients) if clients else n_clients
    # one process per site: with fewer, the simulator swaps sites in and out and their state is lost
    cmd = [*nvflare_command(), "simulator", str(job_dir), "-w", str(workspace), "-t", str(threads or n_sites)]
    cmd += ["-c", ",".join(clients)] if clients else ["-n", str(n_clients)]
    start = time.perf_counter()
    log_path = workdir / "simulator.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if progress and re.search(r"iteration \d+/\d+|joined|could not join|at iteration|is back|ERROR|round \d+: site", line):
                print(line.rstrip()[-220:], file=sys.stderr)
        code = proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    run = read_run(checkpoint)
    if code != 0 or "Simulator run error" in log_path.read_text()[-3000:]:
        reason = f": {run['reason']}" if run and run.get("reason") else ""
        raise RuntimeError(f"nvflare simulator failed (exit {code}){reason}; see {log_path}:\n"
                           f"{log_path.read_text()[-2000:]}")
    ledgers = sorted(str(p) for p in workspace.rglob(wire.LEDGER_FILE))
    return {"checkpoint": str(checkpoint), "ledgers": ledgers, "rounds": run["accepted_iterations"] if run else None,
            "sites": run["sites"] if run else [], "seconds": seconds, "log": str(log_path), "workspace": str(workspace)}
