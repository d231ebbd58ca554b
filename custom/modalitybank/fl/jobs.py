"""Job folders: find one, copy it with its settings overridden, run it in the NVFlare simulator.

The folders in ``jobs/`` run as they are (``nvflare simulator jobs/<name> -w WS -n 3 -t 3``);
:func:`prepare_job` writes a copy whose component arguments (scale, iterations, data location,
checkpoint folder, ...) are set from the command line, so that nothing is edited by hand.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["JOBS_DIR", "find_job", "prepare_job", "simulate"]

#: ``jobs/`` of the repository this package was installed from.
JOBS_DIR = Path(__file__).resolve().parents[3] / "jobs"
_CONFIGS = ("config_fed_server.json", "config_fed_client.json")


def find_job(job: str | Path) -> Path:
    """A job folder given as a path, or by name under :data:`JOBS_DIR`."""
    path = Path(job)
    if (path / "meta.json").is_file():
        return path.resolve()
    named = JOBS_DIR / str(job)
    if (named / "meta.json").is_file():
        return named
    known = sorted(p.name for p in JOBS_DIR.glob("*") if (p / "meta.json").is_file())
    raise FileNotFoundError(f"no job {job!r}: not a job folder, and not one of {known} in {JOBS_DIR}")


def _override(node: Any, updates: dict[str, Any]) -> None:
    """Set every component argument named in ``updates`` wherever it appears in a config."""
    if isinstance(node, dict):
        args = node.get("args")
        if "path" in node and isinstance(args, dict):
            for key, value in updates.items():
                if key in args:
                    args[key] = value
        for value in node.values():
            _override(value, updates)
    elif isinstance(node, list):
        for value in node:
            _override(value, updates)


def prepare_job(job: str | Path, out_dir: str | Path, **updates: Any) -> Path:
    """Copy ``job`` to ``out_dir`` (code links resolved) with component arguments set from ``updates``."""
    src, out = find_job(job), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    updates = {k: v for k, v in updates.items() if v is not None}
    for config in out.rglob("config_fed_*.json"):
        data = json.loads(config.read_text())
        _override(data, updates)
        config.write_text(json.dumps(data, indent=2))
    return out


def _nvflare() -> str:
    exe = Path(sys.executable).with_name("nvflare")
    return str(exe) if exe.exists() else (shutil.which("nvflare") or "nvflare")


def simulate(job: str | Path, workdir: str | Path, scale: str = "tiny", rounds: int | None = None,
             n_clients: int = 3, threads: int | None = None, clients: list[str] | None = None,
             progress: bool = True, **updates: Any) -> dict[str, Any]:
    """Run ``job`` in the NVFlare simulator inside ``workdir``; a second run there resumes.

    ``workdir/checkpoint`` holds the generator (stable across runs, so a restarted server
    resumes from it), ``workdir/workspace`` the simulator's workspace (sites' ledgers and
    discriminators), ``workdir/simulator.log`` the log.
    """
    import torch

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    name = find_job(job).name
    checkpoint = workdir / "checkpoint"
    job_dir = prepare_job(job, workdir / "job" / name, scale=scale, iterations=rounds, num_rounds=rounds,
                          checkpoint_dir=str(checkpoint), **updates)
    workspace = workdir / "workspace"
    cmd = [_nvflare(), "simulator", str(job_dir), "-w", str(workspace), "-t", str(threads or n_clients)]
    cmd += ["-c", ",".join(clients)] if clients else ["-n", str(n_clients)]
    start = time.perf_counter()
    log_path = workdir / "simulator.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if progress and re.search(r"iteration \d+/\d+|joined|could not join|at iteration|is back|ERROR", line):
                print(line.rstrip()[-220:], file=sys.stderr)
        code = proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    tail = log_path.read_text()[-3000:]
    if code != 0 or "Simulator run error" in tail:
        raise RuntimeError(f"nvflare simulator failed (exit {code}); see {log_path}:\n{tail}")
    ledgers = sorted(str(p) for p in workspace.rglob("modalitybank_ledger.jsonl"))
    state = checkpoint / "server_state.pt"
    done = torch.load(state, map_location="cpu", weights_only=False)["iteration"] if state.is_file() else None
    sites = sorted({json.loads(line)["site"] for path in ledgers if "/server/" in path
                    for line in Path(path).read_text().splitlines() if line.strip()})
    return {"checkpoint": str(checkpoint), "ledgers": ledgers, "rounds": done, "sites": sites, "seconds": seconds,
            "log": str(log_path)}
