"""Running the NVFlare CLI and the processes of a local federation: every command with a timeout,
inside the work folder; leftovers found by their own PIDs; what listens where, checked on /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["check_loopback", "cli_env", "crash", "kill_leftovers", "listening", "log_tail", "nvflare", "nvflare_command"]

# -- running the NVFlare CLI ----------------------------------------------------------------

def cli_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment of every NVFlare command and process: its own HOME, this interpreter first on PATH."""
    from modalitybank.config import CACHE_ROOT

    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MODALITYBANK_HOME=str(CACHE_ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def nvflare_command() -> list[str]:
    """The NVFlare CLI of this interpreter (``python -m nvflare.cli``): the processes it starts then
    import the same ``modalitybank`` as the caller, also from a virtual environment."""
    return [sys.executable, "-m", "nvflare.cli"]


def nvflare(args: list[str], env: dict[str, str], workdir: Path, timeout: float, check: bool = True,
            as_json: bool = True) -> dict[str, Any]:
    """Run one ``nvflare`` command; its output goes to files (services it starts outlive it).

    Returns ``{"rc", "out", "data"}`` (``data``: the JSON envelope's ``data`` with ``as_json``).
    Raises ``RuntimeError`` on a timeout, or on a non-zero exit with ``check``.
    """
    args = [str(a) for a in args]
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = nvflare_command() + (["--format", "json"] if as_json else []) + args
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


def crash(root: str | Path) -> list[int]:
    """``kill -9`` of every process of ``root`` at once (a participant's parent and job processes), as a
    crash of its machine would end them; returns their PIDs."""
    pids = _pids_under(Path(root).resolve())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


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


def check_loopback(root: Path) -> list[dict[str, Any]]:
    sockets = listening(root)
    wide = [s for s in sockets if not (s["address"].startswith("127.") or s["address"] == "::1")]
    if wide:
        raise RuntimeError(f"federation processes listen beyond loopback: {wide}")
    return sockets


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
