"""Real NVFlare federations on localhost, each one call: a POC and a provisioned (mutual TLS) one.

Both start a server and the three hospitals of ``jobs/project/provision.yml`` as separate
processes on this machine, submit a job with the admin's startup kit, wait for it, download its
result and stop everything again, on failure too.

* :func:`run_poc`: ``nvflare poc prepare -i project.yml`` / ``poc start`` / ``poc stop``.
* :func:`run_provisioned`: ``nvflare provision``, one ``startup/sub_start.sh`` per kit, the
  admin kit for ``system status``, ``job submit/wait/download`` and ``system shutdown``.
* :func:`foreign_ca_check`: a hospital holding a kit of another provisioning (another root CA)
  is refused by the server of the first.

Everything stays inside ``workdir``: the NVFlare CLI runs with ``HOME=workdir/home`` (``nvflare
poc prepare`` registers startup kits in ``~/.nvflare/config.conf``; the user's own file is never
touched), the POC workspace is ``workdir/poc`` (``NVFLARE_POC_WORKSPACE``), the server's job store
and snapshots are moved from ``/tmp/nvflare`` into the kits' folder. The server is named
``localhost``: it binds 127.0.0.1 only, and :func:`listening` checks that on the running processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from modalitybank.fl import wire
from modalitybank.fl.jobs import export_job, find_job, read_run
from modalitybank.fl.policy import admit_package, set_byoc
from modalitybank.fl.processes import (
    check_loopback,
    cli_env,
    kill_leftovers,
    log_tail,
    nvflare,
    nvflare_command,
)
from modalitybank.fl.rejoin import add_to_server_kit
from modalitybank.fl.site_config import SITE_CONFIG_FILE
from modalitybank.resources import shared_dir

__all__ = ["ADMIN", "PROJECT_FILE", "SITES", "drop_unsubmittable", "prepare_kit", "provision", "run_poc",
           "run_provisioned", "start_kit", "stop_all", "submit_job", "wait_for_clients",
           "write_project"]

PROJECT_FILE = shared_dir("jobs") / "project" / "provision.yml"
SERVER = "localhost"
SITES = ("hospital-a", "hospital-b", "hospital-c")
ADMIN = "admin@modalitybank.org"


@contextmanager
def stoppable() -> Iterator[None]:
    """Turn SIGTERM into an exception while the block runs, so that its ``finally`` stops the federation."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"[fl] {message}", file=sys.stderr, flush=True)


# -- ports and the project file -------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(preferred: tuple[int, int] | None = None) -> tuple[int, int]:
    """``preferred`` (federation, admin) if both are free on 127.0.0.1, else two free ports."""
    if preferred and all(_port_free(p) for p in preferred):
        return preferred
    socks = [socket.socket() for _ in range(2)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def write_project(path: str | Path, ports: tuple[int, int] | None = None, template: str | Path = PROJECT_FILE) -> Path:
    """Copy the project file to ``path`` with the server's ports set (free ones if the file's are taken)."""
    project = yaml.safe_load(Path(template).read_text())
    server = next(p for p in project["participants"] if p["type"] == "server")
    if server["name"] != SERVER:
        raise ValueError(f"the server in {template} must be named {SERVER!r} (binds loopback only)")
    server["fed_learn_port"], server["admin_port"] = ports or free_ports(
        (server.get("fed_learn_port", 8102), server.get("admin_port", 8103)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def open_workdir(workdir: str | Path, ports: tuple[int, int] | None) -> tuple[Path, dict[str, str], Path, int]:
    """The resolved work folder, the NVFlare CLI's environment, the project file written there and
    the server's federated-learning port."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    project = write_project(workdir / "project.yml", ports)
    return workdir, cli_env(workdir), project, server_ports(read_project(project))[0]


def read_project(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def server_ports(project: dict[str, Any]) -> tuple[int, int]:
    server = next(p for p in project["participants"] if p["type"] == "server")
    return int(server["fed_learn_port"]), int(server["admin_port"])


# -- provisioned kits -----------------------------------------------------------------------

def provision(project: Path, workspace: Path, env: dict[str, str], workdir: Path, with_code: bool = False,
              site_config: str | Path | None = None) -> Path:
    """``nvflare provision``; returns the kits' folder (``workspace/<project>/prod_NN``), made ready to start."""
    nvflare(["provision", "-p", project, "-w", workspace, "--force"], env, workdir, timeout=120, as_json=False)
    name = read_project(project)["name"]
    prod = sorted((workspace / name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    local_storage(prod / SERVER, workspace)
    for kit in [prod / SERVER, *(prod / s for s in SITES)]:
        prepare_kit(kit, with_code, site_config)
    return prod


def local_storage(server_kit: Path, root: Path) -> None:
    """Move the server's job store and snapshots from the shared /tmp/nvflare into ``root``."""
    local = server_kit / "local"
    src = local / "resources.json" if (local / "resources.json").is_file() else local / "resources.json.default"
    resources = json.loads(src.read_text())
    resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(root / "snapshot-storage")
    for component in resources["components"]:
        if component["id"] == "job_manager":
            component["args"]["uri_root"] = str(root / "jobs-storage")
    (local / "resources.json").write_text(json.dumps(resources, indent=2))


def prepare_kit(kit: Path, with_code: bool, site_config: str | Path | None = None) -> None:
    """A participant's local policy, as a hospital's IT would set it: the package's classes admitted
    (``class_allow_list``), jobs carrying code (BYOC) allowed only for ``with_code`` runs, and for a site
    its own settings (``site_config``, a ``modalitybank_site.json``: data folder, privacy mode, ...) in
    its ``local/``, where the site reads them and the job cannot set them. The server, where it has the
    package (not in ``with_code`` runs), gets :class:`~modalitybank.fl.rejoin.SiteRejoin`: a site whose
    client crashed and was started again rejoins the running job."""
    admit_package(kit / "local")
    set_byoc(kit, allowed=with_code)
    if kit.name == SERVER and not with_code:  # the server's parent imports the package: a crashed site rejoins
        add_to_server_kit(kit / "local")
    if site_config is not None and kit.name != SERVER:
        shutil.copyfile(site_config, kit / "local" / SITE_CONFIG_FILE)


def start_kit(kit: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start one participant from its startup kit (``sub_start.sh --once``: the process itself, no restart loop)."""
    for stale in ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl"):
        (kit / stale).unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=kit,
                                start_new_session=True)


def wait_for_port(port: int, proc: subprocess.Popen | None, log: Path, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited (code {proc.returncode}) before listening on {port}:\n{log_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{log_tail(log)}")


def connected_clients(admin_kit: Path, env: dict[str, str], workdir: Path) -> list[str]:
    """Client names the server lists now (``nvflare system status``); empty while none is connected."""
    result = nvflare(["system", "status", "--startup-kit", admin_kit], env, workdir, timeout=60, check=False)
    if result["rc"] != 0:
        if (result["envelope"] or {}).get("error_code") == "SYSTEM_NOT_READY":
            return []
        raise RuntimeError(f"nvflare system status failed: {result['out'][-1500:]}")
    return sorted(c["client_name"] for c in (result["data"] or {}).get("clients", []))


def wait_for_clients(admin_kit: Path, env: dict[str, str], workdir: Path, sites: tuple[str, ...] = SITES,
                     timeout: float = 180.0, procs: dict[str, subprocess.Popen] | None = None) -> list[str]:
    end = time.time() + timeout
    while True:
        clients = connected_clients(admin_kit, env, workdir)
        if set(sites) <= set(clients):
            return clients
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited (code {proc.returncode}) before joining; see {workdir}/logs/{name}.log")
        if time.time() > end:
            raise RuntimeError(f"only {clients} of {list(sites)} connected after {timeout:.0f} s; see {workdir}/logs")
        time.sleep(2)


def stop_all(procs: dict[str, subprocess.Popen], admin_kit: Path | None, env: dict[str, str], workdir: Path,
             root: Path) -> None:
    """Shut the system down through the admin kit (if given), then end whatever of ``root`` is left."""
    if admin_kit is not None and any(p.poll() is None for p in procs.values()):
        try:
            nvflare(["system", "shutdown", "all", "--force", "--timeout", "30", "--startup-kit", admin_kit], env,
                    workdir, timeout=60, check=False)
        except RuntimeError:
            pass
        end = time.time() + 20
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs.values() if p.poll() is None]
        for proc in alive:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        for proc in alive:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
    kill_leftovers(root, grace=5)


# -- the job --------------------------------------------------------------------------------

def submit_job(job_dir: Path, admin_kit: Path, env: dict[str, str], workdir: Path, timeout: float,
               server_kit: Path, progress: bool = True) -> tuple[str, Path]:
    """Submit, wait (showing the server's iterations), download; returns the job id and its downloaded folder."""
    try:
        job_id = nvflare(["job", "submit", "-j", job_dir, "--startup-kit", admin_kit], env, workdir,
                         timeout=180)["data"]["job_id"]
    except RuntimeError as err:
        if "parse file" in str(err):  # nvflare 2.9 reads every .json/.conf/.yml/... under app/custom as a config
            raise RuntimeError(f"{err}\n`nvflare job submit` parses every config-like file (.json, .conf, .yml, "
                               f"...) under the job's app*/custom/ with pyhocon: drop or rename the file named "
                               f"above in {job_dir}") from err
        raise
    say(progress, f"job {job_id} submitted")
    cmd = [*nvflare_command(), "--format", "json", "job", "wait", job_id, "--timeout", str(int(timeout)), "--interval", "2",
           "--startup-kit", str(admin_kit)]
    log_path, seen, server_log = workdir / "logs" / "job-wait.out", 0, server_kit / job_id / "log.txt"
    with open(log_path, "w") as out:
        waiter = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir)
        try:
            deadline = time.time() + timeout + 60
            while waiter.poll() is None:
                if time.time() > deadline:
                    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")
                lines = log_tail(server_log, 10**7).splitlines()
                for line in lines[seen:]:
                    if re.search(r"iteration \d+/\d+|joined|could not join|is back|round \d+|ERROR", line):
                        say(progress, line.rstrip().rsplit("] - ", 1)[-1][:200])
                seen = len(lines)
                time.sleep(1)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
    text = log_path.read_text()
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), "{}")
    data = (json.loads(line).get("data") or {}) if line else {}
    status = data.get("status") or data.get("job_meta", {}).get("status")
    out_dir = workdir / "result"

    def download(check: bool = True) -> Path:
        result = nvflare(["job", "download", job_id, "-o", out_dir, "--force", "--startup-kit", admin_kit], env,
                         workdir, timeout=300, check=check)
        return Path((result.get("data") or {}).get("download_path") or out_dir / job_id)

    if waiter.returncode != 0 or status != "FINISHED:COMPLETED":
        run = read_run(download(check=False) / "workspace" / "checkpoint")  # the run says why it failed
        reason = f"{run['reason']}\n" if run and run.get("reason") else ""
        raise RuntimeError(f"job {job_id} ended {status or 'without a status'} (exit {waiter.returncode}): {reason}"
                           f"{text[-1500:]}\nserver log of the job: {server_log}\n{log_tail(server_log, 2500)}")
    say(progress, f"job {job_id} {status}")
    return job_id, download()


def _collect(job_id: str, download: Path, kits: Path, job_dir: Path) -> dict[str, Any]:
    """The run's result: checkpoint and ledgers (server's from the download, the sites' from their workspaces)."""
    workspace = download / "workspace"
    checkpoint = workspace / "checkpoint"
    server_cfg = json.loads(next(job_dir.rglob("config_fed_server.json")).read_text())
    wants_checkpoint = '"checkpoint_dir"' in json.dumps(server_cfg)
    if wants_checkpoint:
        missing = [p for p in ("generator.json", "base.pt") if not (checkpoint / p).is_file()]
        if missing or not list((checkpoint / "entries").glob("*.pt")):
            raise RuntimeError(f"the downloaded result {download} lacks the checkpoint ({missing or 'entries/*.pt'})")
    server_ledger = workspace / wire.LEDGER_FILE
    ledgers = ([str(server_ledger)] if server_ledger.is_file() else []) + sorted(
        str(p) for site in SITES for p in [kits / site / job_id / wire.LEDGER_FILE] if p.is_file())
    if wants_checkpoint and not server_ledger.is_file():
        raise RuntimeError(f"the downloaded result {download} lacks the server ledger")
    run = read_run(checkpoint)  # what the run trained: iterations with accepted gradients, contributing sites
    metrics = checkpoint / "metrics.jsonl"
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return {"checkpoint": str(checkpoint) if checkpoint.is_dir() else None, "ledgers": ledgers,
            "rounds": run["accepted_iterations"] if run else None, "sites": run["sites"] if run else [],
            "job_id": job_id,  # the server's time per iteration, the first (warm-up) left out where there are more
            "seconds_per_iteration": round(statistics.median(seconds[1:] or seconds), 4) if seconds else None}


def _prepare(job: str | Path, workdir: Path, scale: str | None, rounds: int | None, updates: dict[str, Any],
             with_code: bool, progress: bool = True) -> Path:
    """The job folder to submit: the committed one as it is when nothing is to change, else an export."""
    if scale is None and rounds is None and not with_code and all(v is None for v in updates.values()):
        say(progress, f"submitting {find_job(job)} as it is")
        return find_job(job)
    job_dir = export_job(job, workdir / "job" / Path(job).name, with_code=with_code, scale=scale, rounds=rounds,
                         **updates)
    dropped = drop_unsubmittable(job_dir)
    if dropped:
        say(progress, f"left out of the submitted job (not HOCON, `nvflare job submit` cannot index them): {dropped}")
    return job_dir


def drop_unsubmittable(job_dir: Path) -> list[str]:
    """Delete from a prepared job copy the ``.conf`` files under ``app*/custom/`` that are not HOCON.

    ``nvflare job submit`` (2.9) parses every config-like file under a job's ``custom/`` folder with
    pyhocon and refuses the job if one fails; a MONAI bundle's ``configs/logging.conf`` (Python
    logging, INI syntax) does. Our code never reads those files; the simulator does not index them.
    """
    from pyhocon import ConfigFactory

    dropped = []
    for path in sorted(job_dir.glob("*/custom/**/*.conf")):
        try:
            ConfigFactory.parse_file(str(path))
        except Exception:
            path.unlink()
            dropped.append(str(path.relative_to(job_dir)))
    return dropped


# -- the two federations --------------------------------------------------------------------

@stoppable()
def run_poc(workdir: str | Path, job: str | Path = "modalitybank_multimodal", scale: str | None = None,
            rounds: int | None = None, ports: tuple[int, int] | None = None, timeout: float = 1800.0,
            progress: bool = True, with_code: bool = False, site_config: str | Path | None = None,
            **updates: Any) -> dict[str, Any]:
    """A POC federation (server ``localhost``, hospital-a/b/c, the admin) in ``workdir``: run ``job`` once, stop.

    ``updates`` are component arguments of the job (``data_root``, ``pretrained``, ``resume_from``,
    ``add_modalities``, ...). ``site_config``: the sites' own settings, put into each site's ``local/``
    (one file for all: ``{"default": .., "sites": {"hospital-a": ..}}``). Returns
    ``{"checkpoint", "ledgers", "rounds", "sites", "seconds", "job_id", "listening"}``.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    poc = workdir / "poc"
    env = cli_env(workdir, NVFLARE_POC_WORKSPACE=str(poc))
    project = write_project(workdir / "project.yml", ports)
    job_dir = _prepare(job, workdir, scale, rounds, updates, with_code, progress)
    name = read_project(project)["name"]
    started = False
    try:
        nvflare(["poc", "prepare", "-i", project, "--force"], env, workdir, timeout=120, as_json=False)
        kits = sorted((poc / name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
        for kit in [kits / SERVER, *(kits / s for s in SITES)]:
            prepare_kit(kit, with_code, site_config)
        say(progress, f"POC prepared in {poc} (ports {server_ports(read_project(project))}); starting")
        started = True
        nvflare(["poc", "start", "--timeout", "180"], env, workdir, timeout=240, as_json=False)
        admin = kits / ADMIN
        clients = wait_for_clients(admin, env, workdir, timeout=120)
        sockets = check_loopback(poc)
        say(progress, f"clients {clients} connected; listening {[(s['address'], s['port']) for s in sockets]}")
        job_id, download = submit_job(job_dir, admin, env, workdir, timeout, kits / SERVER, progress)
        result = _collect(job_id, download, kits, job_dir)
    finally:
        if started:
            try:
                nvflare(["poc", "stop"], env, workdir, timeout=120, check=False, as_json=False)
            except RuntimeError:
                pass
        kill_leftovers(poc)
    return result | {"seconds": round(time.perf_counter() - t0, 1), "listening": sockets, "job_dir": str(job_dir)}


@stoppable()
def run_provisioned(workdir: str | Path, job: str | Path = "modalitybank_multimodal", scale: str | None = None,
                    rounds: int | None = None, ports: tuple[int, int] | None = None, timeout: float = 1800.0,
                    progress: bool = True, with_code: bool = False, site_config: str | Path | None = None,
                    **updates: Any) -> dict[str, Any]:
    """Provision the project (mutual TLS) into ``workdir/kits``, start every kit, run ``job`` once, shut down.

    ``updates`` and ``site_config`` as for :func:`run_poc`."""
    t0 = time.perf_counter()
    workdir, env, project, fed_port = open_workdir(workdir, ports)
    job_dir = _prepare(job, workdir, scale, rounds, updates, with_code, progress)
    root = workdir / "kits"
    if root.exists():
        kill_leftovers(root, grace=0)
        shutil.rmtree(root)
    kits = provision(project, root, env, workdir, with_code, site_config)
    procs: dict[str, subprocess.Popen] = {}
    admin = kits / ADMIN
    try:
        procs[SERVER] = start_kit(kits / SERVER, env, workdir / "logs" / f"{SERVER}.log")
        wait_for_port(fed_port, procs[SERVER], workdir / "logs" / f"{SERVER}.log")
        for site in SITES:
            procs[site] = start_kit(kits / site, env, workdir / "logs" / f"{site}.log")
        clients = wait_for_clients(admin, env, workdir, procs=procs)
        sockets = check_loopback(root)
        say(progress, f"provisioned kits in {kits}; clients {clients} connected over mutual TLS; listening "
             f"{[(s['address'], s['port']) for s in sockets]}")
        job_id, download = submit_job(job_dir, admin, env, workdir, timeout, kits / SERVER, progress)
        result = _collect(job_id, download, kits, job_dir)
    finally:
        stop_all(procs, admin, env, workdir, root)
    return result | {"seconds": round(time.perf_counter() - t0, 1), "listening": sockets, "job_dir": str(job_dir)}
