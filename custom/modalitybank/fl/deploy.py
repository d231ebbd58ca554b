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
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from modalitybank.fl.jobs import JOBS_DIR, find_job, prepare_job

__all__ = ["ADMIN", "PROJECT_FILE", "SITES", "drop_unsubmittable", "foreign_ca_check", "listening", "provision", "run_poc",
           "run_provisioned", "start_kit", "stop_all", "submit_job", "tls_probe", "wait_for_clients",
           "write_project"]

PROJECT_FILE = JOBS_DIR / "project" / "provision.yml"
SERVER = "localhost"
SITES = ("hospital-a", "hospital-b", "hospital-c")
ADMIN = "admin@modalitybank.org"


@contextmanager
def _stoppable() -> Iterator[None]:
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


def _say(progress: bool, message: str) -> None:
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


def _project(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _server_ports(project: dict[str, Any]) -> tuple[int, int]:
    server = next(p for p in project["participants"] if p["type"] == "server")
    return int(server["fed_learn_port"]), int(server["admin_port"])


# -- running the NVFlare CLI ----------------------------------------------------------------

def _env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment of every NVFlare command and process: its own HOME, this interpreter first on PATH."""
    from modalitybank.data.default import CACHE_ROOT

    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MODALITYBANK_HOME=str(CACHE_ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def _nvflare_exe() -> str:
    exe = Path(sys.executable).with_name("nvflare")
    return str(exe) if exe.exists() else (shutil.which("nvflare") or "nvflare")


def nvflare(args: list[str], env: dict[str, str], workdir: Path, timeout: float, check: bool = True,
            as_json: bool = True) -> dict[str, Any]:
    """Run one ``nvflare`` command; its output goes to files (services it starts outlive it).

    Returns ``{"rc", "out", "data"}`` (``data``: the JSON envelope's ``data`` with ``as_json``).
    Raises ``RuntimeError`` on a timeout, or on a non-zero exit with ``check``.
    """
    args = [str(a) for a in args]
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [_nvflare_exe()] + (["--format", "json"] if as_json else []) + args
    out_path, err_path = logs / "nvflare.out", logs / "nvflare.err"
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=workdir,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    text, err_text = out_path.read_text(), err_path.read_text()
    with open(logs / "nvflare-cli.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{text}{err_text}[exit {rc}, {time.perf_counter() - t0:.1f} s]\n\n")
    if rc is None:
        raise RuntimeError(f"`nvflare {' '.join(args[:3])}` did not finish in {timeout:.0f} s; see {logs}/nvflare-cli.log")
    envelope: dict[str, Any] = {}
    if as_json:
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), "")
        try:
            envelope = json.loads(line) if line else {}
        except json.JSONDecodeError:
            envelope = {}
    if check and rc != 0:
        reason = envelope.get("message") or (text + err_text).strip()[-1500:]
        raise RuntimeError(f"`nvflare {' '.join(args[:3])}` failed (exit {rc}): {reason}")
    return {"rc": rc, "out": text + err_text, "data": envelope.get("data"), "envelope": envelope}


# -- processes ------------------------------------------------------------------------------

def _pids_under(root: Path) -> list[int]:
    """Processes whose command line names a path inside ``root`` (not this one or its parents).

    Every NVFlare process of a kit carries its workspace (``-m <kit>``, ``<kit>/startup/sub_start.sh``).
    """
    me, parents, pid = os.getpid(), set(), os.getpid()
    while pid > 1:
        parents.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    root_s, found = str(root), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in parents or int(entry.name) == me:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == root_s or a.startswith(root_s + os.sep) for a in args):
            found.append(int(entry.name))
    return found


def kill_leftovers(root: str | Path, grace: float = 15.0) -> list[int]:
    """Wait up to ``grace`` s for the processes of ``root`` to end, then terminate, then kill them."""
    root = Path(root).resolve()
    end = time.time() + grace
    while (pids := _pids_under(root)) and time.time() < end:
        time.sleep(0.5)
    killed = list(pids)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + wait
        while (pids := _pids_under(root)) and time.time() < end:
            time.sleep(0.2)
        if not pids:
            break
    return killed


def listening(root: str | Path) -> list[dict[str, Any]]:
    """TCP sockets in LISTEN state held by the processes of ``root`` (from /proc): address, port, pid."""
    inodes: dict[str, int] = {}
    for pid in _pids_under(Path(root).resolve()):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words little-endian
            found.append({"address": socket.inet_ntop(family, raw), "port": int(hex_port, 16),
                          "pid": inodes[fields[9]]})
    return sorted(found, key=lambda x: (x["port"], x["address"]))


def _check_loopback(root: Path) -> list[dict[str, Any]]:
    sockets = listening(root)
    wide = [s for s in sockets if not (s["address"].startswith("127.") or s["address"] == "::1")]
    if wide:
        raise RuntimeError(f"federation processes listen beyond loopback: {wide}")
    return sockets


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- provisioned kits -----------------------------------------------------------------------

def provision(project: Path, workspace: Path, env: dict[str, str], workdir: Path) -> Path:
    """``nvflare provision``; returns the kits' folder (``workspace/<project>/prod_NN``), made ready to start."""
    nvflare(["provision", "-p", project, "-w", workspace, "--force"], env, workdir, timeout=120, as_json=False)
    name = _project(project)["name"]
    prod = sorted((workspace / name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    local_storage(prod / SERVER, workspace)
    for kit in [prod / SERVER, *(prod / s for s in SITES)]:
        allow_byoc(kit)
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


def allow_byoc(kit: Path, role: str = "project_admin") -> bool:
    """Make sure ``role`` may submit jobs with custom code (``byoc``) at this site; True if it had to change.

    NVFlare's generated policy (``local/authorization.json.default``) gives the project admin
    ``any`` right, byoc included, so normally nothing is written; a site whose policy says
    otherwise gets ``local/authorization.json`` with byoc allowed for ``role``.
    """
    local = kit / "local"
    path = local / "authorization.json" if (local / "authorization.json").is_file() else local / "authorization.json.default"
    if not path.is_file():
        return False
    policy = json.loads(path.read_text())
    rights = policy.setdefault("permissions", {}).get(role)
    if rights == "any" or (isinstance(rights, dict) and rights.get("byoc") == "any" and rights.get("submit_job") == "any"):
        return False
    rights = dict(rights) if isinstance(rights, dict) else {}
    rights.update(byoc="any", submit_job="any", download_job="any", manage_job="any", view="any")
    policy["permissions"][role] = rights
    (local / "authorization.json").write_text(json.dumps(policy, indent=2))
    return True


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
            raise RuntimeError(f"the server exited (code {proc.returncode}) before listening on {port}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{_tail(log)}")


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
    _say(progress, f"job {job_id} submitted")
    cmd = [_nvflare_exe(), "--format", "json", "job", "wait", job_id, "--timeout", str(int(timeout)), "--interval", "2",
           "--startup-kit", str(admin_kit)]
    log_path, seen, server_log = workdir / "logs" / "job-wait.out", 0, server_kit / job_id / "log.txt"
    with open(log_path, "w") as out:
        waiter = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir)
        try:
            deadline = time.time() + timeout + 60
            while waiter.poll() is None:
                if time.time() > deadline:
                    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")
                lines = _tail(server_log, 10**7).splitlines()
                for line in lines[seen:]:
                    if re.search(r"iteration \d+/\d+|joined|could not join|is back|round \d+|ERROR", line):
                        _say(progress, line.rstrip().rsplit("] - ", 1)[-1][:200])
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
    if waiter.returncode != 0 or status != "FINISHED:COMPLETED":
        raise RuntimeError(f"job {job_id} ended {status or 'without a status'} (exit {waiter.returncode}): "
                           f"{text[-1500:]}\nserver log of the job: {server_log}\n{_tail(server_log, 2500)}")
    _say(progress, f"job {job_id} {status}")
    out_dir = workdir / "result"
    result = nvflare(["job", "download", job_id, "-o", out_dir, "--force", "--startup-kit", admin_kit], env, workdir,
                     timeout=300)
    return job_id, Path(result["data"].get("download_path") or out_dir / job_id)


def _collect(job_id: str, download: Path, kits: Path, job_dir: Path) -> dict[str, Any]:
    """The run's result: checkpoint and ledgers (server's from the download, the sites' from their workspaces)."""
    import torch

    workspace = download / "workspace"
    checkpoint = workspace / "checkpoint"
    server_cfg = json.loads(next(job_dir.rglob("config_fed_server.json")).read_text())
    wants_checkpoint = '"checkpoint_dir"' in json.dumps(server_cfg)
    if wants_checkpoint:
        missing = [p for p in ("generator.json", "base.pt") if not (checkpoint / p).is_file()]
        if missing or not list((checkpoint / "entries").glob("*.pt")):
            raise RuntimeError(f"the downloaded result {download} lacks the checkpoint ({missing or 'entries/*.pt'})")
    server_ledger = workspace / "modalitybank_ledger.jsonl"
    ledgers = ([str(server_ledger)] if server_ledger.is_file() else []) + sorted(
        str(p) for site in SITES for p in [kits / site / job_id / "modalitybank_ledger.jsonl"] if p.is_file())
    if wants_checkpoint and not server_ledger.is_file():
        raise RuntimeError(f"the downloaded result {download} lacks the server ledger")
    state = checkpoint / "server_state.pt"
    rounds = torch.load(state, map_location="cpu", weights_only=False)["iteration"] if state.is_file() else None
    sites = sorted({json.loads(line)["site"] for line in _tail(server_ledger, 10**9).splitlines() if line.strip()})
    return {"checkpoint": str(checkpoint) if checkpoint.is_dir() else None, "ledgers": ledgers, "rounds": rounds,
            "sites": sites, "job_id": job_id}


def _prepare(job: str | Path, workdir: Path, scale: str, rounds: int | None, updates: dict[str, Any],
             progress: bool = True) -> Path:
    name = find_job(job).name
    job_dir = prepare_job(job, workdir / "job" / name, scale=scale, iterations=rounds, num_rounds=rounds,
                          checkpoint_dir="checkpoint", **updates)
    dropped = drop_unsubmittable(job_dir)
    if dropped:
        _say(progress, f"left out of the submitted job (not HOCON, `nvflare job submit` cannot index them): {dropped}")
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

@_stoppable()
def run_poc(workdir: str | Path, job: str | Path = "modalitybank_multimodal", scale: str = "tiny",
            rounds: int | None = None, ports: tuple[int, int] | None = None, timeout: float = 1800.0,
            progress: bool = True, **updates: Any) -> dict[str, Any]:
    """A POC federation (server ``localhost``, hospital-a/b/c, the admin) in ``workdir``: run ``job`` once, stop.

    ``updates`` are component arguments of the job (``data_root``, ``pretrained``, ...). Returns
    ``{"checkpoint", "ledgers", "rounds", "sites", "seconds", "job_id", "listening"}``.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    poc = workdir / "poc"
    env = _env(workdir, NVFLARE_POC_WORKSPACE=str(poc))
    project = write_project(workdir / "project.yml", ports)
    job_dir = _prepare(job, workdir, scale, rounds, updates, progress)
    name = _project(project)["name"]
    started = False
    try:
        nvflare(["poc", "prepare", "-i", project, "--force"], env, workdir, timeout=120, as_json=False)
        kits = sorted((poc / name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
        for kit in [kits / SERVER, *(kits / s for s in SITES)]:
            allow_byoc(kit)
        _say(progress, f"POC prepared in {poc} (ports {_server_ports(_project(project))}); starting")
        started = True
        nvflare(["poc", "start", "--timeout", "180"], env, workdir, timeout=240, as_json=False)
        admin = kits / ADMIN
        clients = wait_for_clients(admin, env, workdir, timeout=120)
        sockets = _check_loopback(poc)
        _say(progress, f"clients {clients} connected; listening {[(s['address'], s['port']) for s in sockets]}")
        job_id, download = submit_job(job_dir, admin, env, workdir, timeout, kits / SERVER, progress)
        result = _collect(job_id, download, kits, job_dir)
    finally:
        if started:
            try:
                nvflare(["poc", "stop"], env, workdir, timeout=120, check=False, as_json=False)
            except RuntimeError:
                pass
        kill_leftovers(poc)
    return result | {"seconds": round(time.perf_counter() - t0, 1), "listening": sockets}


@_stoppable()
def run_provisioned(workdir: str | Path, job: str | Path = "modalitybank_multimodal", scale: str = "tiny",
                    rounds: int | None = None, ports: tuple[int, int] | None = None, timeout: float = 1800.0,
                    progress: bool = True, **updates: Any) -> dict[str, Any]:
    """Provision the project (mutual TLS) into ``workdir/kits``, start every kit, run ``job`` once, shut down."""
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = _env(workdir)
    project = write_project(workdir / "project.yml", ports)
    fed_port, _ = _server_ports(_project(project))
    job_dir = _prepare(job, workdir, scale, rounds, updates, progress)
    root = workdir / "kits"
    if root.exists():
        kill_leftovers(root, grace=0)
        shutil.rmtree(root)
    kits = provision(project, root, env, workdir)
    procs: dict[str, subprocess.Popen] = {}
    admin = kits / ADMIN
    try:
        procs[SERVER] = start_kit(kits / SERVER, env, workdir / "logs" / f"{SERVER}.log")
        wait_for_port(fed_port, procs[SERVER], workdir / "logs" / f"{SERVER}.log")
        for site in SITES:
            procs[site] = start_kit(kits / site, env, workdir / "logs" / f"{site}.log")
        clients = wait_for_clients(admin, env, workdir, procs=procs)
        sockets = _check_loopback(root)
        _say(progress, f"provisioned kits in {kits}; clients {clients} connected over mutual TLS; listening "
             f"{[(s['address'], s['port']) for s in sockets]}")
        job_id, download = submit_job(job_dir, admin, env, workdir, timeout, kits / SERVER, progress)
        result = _collect(job_id, download, kits, job_dir)
    finally:
        stop_all(procs, admin, env, workdir, root)
    return result | {"seconds": round(time.perf_counter() - t0, 1), "listening": sockets}


# -- another CA -----------------------------------------------------------------------------

def tls_probe(port: int, ca: Path, cert: Path | None = None, key: Path | None = None, timeout: float = 10.0) -> str:
    """Speak HTTPS to 127.0.0.1:``port`` with an optional client certificate; what came of it.

    ``"answered"`` (the server served a request), ``"closed"`` (TLS 1.3: the handshake looked fine
    to the client, then the server dropped the connection without answering) or the TLS error.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=SERVER) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return "answered" if tls.recv(64) else "closed"
    except (ssl.SSLError, OSError) as err:
        return f"{type(err).__name__}: {err}"


@_stoppable()
def foreign_ca_check(workdir: str | Path, site: str = "hospital-a", ports: tuple[int, int] | None = None,
                     wait: float = 90.0, progress: bool = True) -> dict[str, Any]:
    """Start the server of provisioning A and ``site`` from provisioning B (same project, another root CA).

    Returns what happened: ``client_error`` (the TLS error in the foreign client's log, the
    server's certificate does not chain to B's CA), ``clients_with_foreign`` (what the server lists
    meanwhile: must not hold ``site``), ``probes`` (raw TLS to the server: with B's certificate,
    even trusting A's CA, and with none, the server must not answer; with A's own it answers) and,
    as a control, ``clients_with_own`` once ``site`` runs from its genuine kit A.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = _env(workdir)
    project = write_project(workdir / "project.yml", ports)
    fed_port, _ = _server_ports(_project(project))
    roots = {"a": workdir / "ca-a", "b": workdir / "ca-b"}
    for root in roots.values():
        if root.exists():
            kill_leftovers(root, grace=0)
            shutil.rmtree(root)
    kits = {k: provision(project, root, env, workdir) for k, root in roots.items()}
    ca_a, ca_b = (kits[k] / SERVER / "startup" / "rootCA.pem" for k in "ab")
    if ca_a.read_bytes() == ca_b.read_bytes():
        raise RuntimeError("the two provisionings share a root CA")
    admin, logs = kits["a"] / ADMIN, workdir / "logs"
    procs: dict[str, subprocess.Popen] = {}
    result: dict[str, Any] = {}
    try:
        procs[SERVER] = start_kit(kits["a"] / SERVER, env, logs / "server-a.log")
        wait_for_port(fed_port, procs[SERVER], logs / "server-a.log")
        own, foreign = kits["a"] / site / "startup", kits["b"] / site / "startup"
        result["probes"] = {
            "own_certificate": tls_probe(fed_port, ca_a, own / "client.crt", own / "client.key"),
            "foreign_certificate": tls_probe(fed_port, ca_a, foreign / "client.crt", foreign / "client.key"),
            "no_certificate": tls_probe(fed_port, ca_a),
        }
        _say(progress, f"server A up on 127.0.0.1:{fed_port}; starting {site} from kit B; probes {result['probes']}")
        procs["foreign"] = start_kit(kits["b"] / site, env, logs / f"{site}-b.log")
        error, end = None, time.time() + wait
        while error is None and time.time() < end and procs["foreign"].poll() is None:
            text = _tail(logs / f"{site}-b.log", 10**6) + _tail(kits["b"] / site / "log.txt", 10**6)
            match = re.search(r".*(CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError|certificate verify failed"
                              r"|ClientConnectorCertificateError).*", text)
            error = match.group(0).strip()[-400:] if match else None
            time.sleep(1)
        result["client_error"] = error
        result["clients_with_foreign"] = connected_clients(admin, env, workdir)
        result["server_saw_client"] = f"New client {site}" in _tail(kits["a"] / SERVER / "log.txt", 10**7)
        stop_all({"foreign": procs.pop("foreign")}, None, env, workdir, roots["b"])
        _say(progress, f"{site} from kit B: {error!r}; server lists {result['clients_with_foreign']}; "
             f"now the control: {site} from its own kit A")
        procs[site] = start_kit(kits["a"] / site, env, logs / f"{site}-a.log")
        result["clients_with_own"] = wait_for_clients(admin, env, workdir, sites=(site,), timeout=wait,
                                                      procs={site: procs[site]})
    finally:
        stop_all(procs, admin, env, workdir, roots["a"])
        kill_leftovers(roots["b"], grace=0)
    refused = (result.get("client_error") is not None and site not in result.get("clients_with_foreign", [site])
               and not result.get("server_saw_client", True)
               and result["probes"]["foreign_certificate"] != "answered"
               and result["probes"]["no_certificate"] != "answered")
    return result | {"refused": refused, "seconds": round(time.perf_counter() - t0, 1)}
