"""A crashed site rejoins the job that is still running (NVFlare 2.9, POC and provisioned federations).

NVFlare keeps a running job's participants by the client token of their first registration. A
site whose client process died and was started again registers with a *new* token, so nothing
starts the running job on it: its parent process only starts job processes when the server's
``JobRunner`` dispatches a job, once. Two small pieces close that gap:

* :class:`SiteRejoin`, a component of the **server's parent process** (a system component in the
  server kit's ``local/resources.json``, added by :func:`add_to_server_kit`): every
  ``check_interval`` seconds it compares the participants of each running job with the clients
  registered now. A participant registered under another token came back as a new process:
  resources are reserved and its job process is started (the calls NVFlare's ``JobRunner`` makes at
  dispatch; the app is deployed again only where the site's folder of the job is gone, so its
  ledger and logs of the job survive the crash) and the job's participants are re-keyed to the new
  token. Logged as ``site NAME rejoined job JOB``.
* :func:`refresh_participants`, called by the job's own server controller while a site is absent:
  the server job process reads the participants again from its parent (it reads them only once,
  at start), so the new process's task requests are accepted.

The new job process starts as a new site would: its discriminators are fresh, its data is read
again; the controller takes it back with the hello it probes absent sites with.

Limitation: where the folder is gone *and* the job asks the site for resources (``resource_spec``;
ours ask none), the site allocates them for the first, failed start and NVFlare frees them only when
that site's parent process ends.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

__all__ = ["COMPONENT_ID", "SiteRejoin", "add_to_server_kit", "refresh_participants"]

COMPONENT_ID = "modalitybank_site_rejoin"


class SiteRejoin(FLComponent):
    """Start a running job again on a participant that re-registered as a new client process.

    Args:
        check_interval: seconds between two comparisons of running jobs' participants with the
            registered clients.
        settle: seconds a re-registered client is given before the job is deployed to it (its
            parent process finishes starting: heartbeat, admin channel).
    """

    def __init__(self, check_interval: float = 2.0, settle: float = 3.0) -> None:
        super().__init__()
        self.check_interval, self.settle = check_interval, settle
        self._stop = threading.Event()
        self._seen: dict[tuple[str, str], float] = {}  # (job, new token) -> when first seen
        self._failed: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.SYSTEM_START and self._thread is None:
            engine = fl_ctx.get_engine()
            self._thread = threading.Thread(target=self._watch, args=(engine,), name="site-rejoin", daemon=True)
            self._thread.start()
        elif event_type == EventType.SYSTEM_END:
            self._stop.set()

    def _watch(self, engine: Any) -> None:
        while not self._stop.wait(self.check_interval):
            try:
                self.check(engine)
            except Exception as err:  # never take the server down; say what failed
                self.logger.error(f"site rejoin check failed: {type(err).__name__}: {err}")

    def check(self, engine: Any) -> list[tuple[str, str]]:
        """Restart the running jobs of every participant registered under a new token; returns
        the (job, site) pairs restarted."""
        from nvflare.apis.fl_constant import RunProcessKey

        restarted = []
        for job_id, info in list(engine.run_processes.items()):
            participants = info.get(RunProcessKey.PARTICIPANTS) or {}
            for old_token, client in list(participants.items()):
                current = engine.get_client_from_name(client.name)
                if current is None or current.token == old_token or (job_id, current.token) in self._failed:
                    continue
                first = self._seen.setdefault((job_id, current.token), time.time())
                if time.time() - first < self.settle:
                    continue
                try:
                    self._restart(engine, job_id, participants, old_token, current)
                    restarted.append((job_id, client.name))
                except Exception as err:
                    self._failed.add((job_id, current.token))
                    self.logger.error(f"site {client.name} could not rejoin job {job_id}: {type(err).__name__}: {err}")
        return restarted

    def _restart(self, engine: Any, job_id: str, participants: dict, old_token: str, client: Any) -> None:
        from nvflare.apis.fl_constant import SystemComponents
        from nvflare.apis.job_def import JobMetaKey
        from nvflare.private.defs import ERROR_MSG_PREFIX

        site = client.name
        with engine.new_context() as fl_ctx:
            job = engine.get_component(SystemComponents.JOB_MANAGER).get_job(job_id, fl_ctx)
            if job is None:
                raise RuntimeError("the job is not in the job store")
            app_name = job.get_application_name(site) or job.get_application_name("@ALL")
            if app_name is None:
                raise RuntimeError(f"the job's deploy map {job.get_deployment()} has no app for it")
            # the job processes of every site read the job's participants from its meta: the new token
            rekeyed = {t: c for t, c in participants.items() if t != old_token} | {client.token: client}
            job.meta[JobMetaKey.JOB_CLIENTS] = [c.to_dict() for c in rekeyed.values()]
            self.logger.info(f"site {site} registered again while job {job_id} runs: starting the job on it again")
            # the site's folder of the job survives a crash (its ledger, its logs): deploying would replace it,
            # so the app is deployed only where it is gone
            answer = self._start(engine, job, site, app_name, fl_ctx)
            if answer.startswith(ERROR_MSG_PREFIX) and "app does not exist" in answer:
                self.logger.info(f"site {site} has no folder of job {job_id} any more: deploying the job to it")
                self._deploy(engine, job, client, app_name, fl_ctx)
                answer = self._start(engine, job, site, app_name, fl_ctx)
            if answer.startswith(ERROR_MSG_PREFIX):
                raise RuntimeError(f"starting its job process failed: {answer}")
            participants.pop(old_token, None)
            participants[client.token] = client
        self.logger.info(f"site {site} rejoined job {job_id}: its job process is started again")

    @staticmethod
    def _start(engine: Any, job: Any, site: str, app_name: str, fl_ctx: FLContext) -> str:
        """Reserve the job's resources on ``site`` and start its job process; the site's answer."""
        from nvflare.apis.job_scheduler_spec import DispatchInfo

        requirements = (job.get_resource_requirements() or {}).get(site, {})
        enough, token = engine.check_client_resources(job, {site: requirements}, fl_ctx).get(site, (False, ""))
        if not enough:
            raise RuntimeError(f"the site has not the job's resources {requirements}")
        replies = engine.start_client_job(job, {site: DispatchInfo(app_name, requirements, token)}, fl_ctx)
        if not replies or replies[0].reply is None:
            raise RuntimeError("the site did not answer the start of its job process")
        return str(replies[0].reply.body)

    @staticmethod
    def _deploy(engine: Any, job: Any, client: Any, app_name: str, fl_ctx: FLContext) -> None:
        """Send the job's app to the site, as NVFlare's ``JobRunner`` does at dispatch."""
        from nvflare.private.admin_defs import MsgHeader, ReturnCode
        from nvflare.private.fed.server.job_runner import JobRunner

        message = JobRunner._make_deploy_message(job, job.get_application(app_name, fl_ctx), app_name, fl_ctx)
        admin = engine.server.admin_server
        reply = admin.send_requests_and_get_reply_dict({client.token: message},
                                                       timeout_secs=admin.timeout).get(client.token)
        if reply is None or reply.get_header(MsgHeader.RETURN_CODE, ReturnCode.OK) != ReturnCode.OK:
            raise RuntimeError(f"deploying the app failed: {getattr(reply, 'body', 'no reply')}")


def add_to_server_kit(local: str | Path, check_interval: float = 2.0) -> Path:
    """Add :class:`SiteRejoin` to the system components of a server kit's ``local/resources.json``
    (the file as :func:`modalitybank.fl.policy.admit_package` leaves it, else the kit's default).
    The server's parent process must be able to import the package."""
    local = Path(local)
    path = local / "resources.json"
    source = path if path.is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    components = [c for c in resources.setdefault("components", []) if c.get("id") != COMPONENT_ID]
    components.append({"id": COMPONENT_ID, "path": f"{SiteRejoin.__module__}.{SiteRejoin.__name__}",
                       "args": {"check_interval": check_interval}})
    resources["components"] = components
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


def refresh_participants(engine: Any, job_id: str) -> bool:
    """In a server job process: read the job's participants again from the parent process (NVFlare reads
    them once, when the job starts), so that a site restarted under a new token is accepted. False where
    there is no parent to ask (the simulator) or it did not answer."""
    from nvflare.private.fed.server.server_engine import ServerEngine
    from nvflare.private.fed.simulator.simulator_server import SimulatorServerEngine

    if not isinstance(engine, ServerEngine) or isinstance(engine, SimulatorServerEngine):
        return False
    retrieve, manager = engine._retrieve_clients_data, engine.client_manager  # private in 2.9: no public call
    try:
        clients = retrieve(job_id)
    except Exception:
        return False
    if not clients:
        return False
    if {c.token for c in clients.values()} != set(manager.clients):
        manager.set_clients(dict(clients))
    return True
