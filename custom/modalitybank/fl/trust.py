"""Mutual TLS holds: a hospital holding a startup kit of another provisioning (another root CA) is
refused by the server of the first, checked on the real server and with raw TLS probes."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from modalitybank.fl.deploy import (
    ADMIN,
    SERVER,
    connected_clients,
    open_workdir,
    provision,
    say,
    start_kit,
    stop_all,
    stoppable,
    wait_for_clients,
    wait_for_port,
)
from modalitybank.fl.processes import kill_leftovers, log_tail

__all__ = ["foreign_ca_check", "tls_probe"]

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


@stoppable()
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
    workdir, env, project, fed_port = open_workdir(workdir, ports)
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
        say(progress, f"server A up on 127.0.0.1:{fed_port}; starting {site} from kit B; probes {result['probes']}")
        procs["foreign"] = start_kit(kits["b"] / site, env, logs / f"{site}-b.log")
        error, end = None, time.time() + wait
        while error is None and time.time() < end and procs["foreign"].poll() is None:
            text = log_tail(logs / f"{site}-b.log", 10**6) + log_tail(kits["b"] / site / "log.txt", 10**6)
            match = re.search(r".*(CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError|certificate verify failed"
                              r"|ClientConnectorCertificateError).*", text)
            error = match.group(0).strip()[-400:] if match else None
            time.sleep(1)
        result["client_error"] = error
        result["clients_with_foreign"] = connected_clients(admin, env, workdir)
        result["server_saw_client"] = f"New client {site}" in log_tail(kits["a"] / SERVER / "log.txt", 10**7)
        stop_all({"foreign": procs.pop("foreign")}, None, env, workdir, roots["b"])
        say(progress, f"{site} from kit B: {error!r}; server lists {result['clients_with_foreign']}; "
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
