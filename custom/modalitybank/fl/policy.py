"""A site's local policy for ModalityBank jobs: which classes it builds, whether it runs carried code.

NVFlare 2.9 builds a job's components only from classes on the site's ``class_allow_list``
(``local/resources.json``; NVFlare's ``ComponentPathAuthorizer``), unless the job carries custom
code (BYOC), which the site's ``local/authorization.json`` may forbid. A hospital with the
``modalitybank`` package installed admits the package's classes and keeps BYOC off
(:func:`admit_package`, :func:`set_byoc`); a simulator workspace gets the same policy in its
``local/`` folder, which ``nvflare simulator`` copies to every simulated site.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["JOB_NVFLARE_CLASSES", "PACKAGE_PREFIX", "admit_package", "set_byoc"]

#: The allow-list entry that admits every class of the package.
PACKAGE_PREFIX = "modalitybank."
#: NVFlare classes our jobs use that NVFlare's default allow-list lacks (the FedAvg job's persistor).
JOB_NVFLARE_CLASSES = ("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",)


def _read(local: Path, name: str, default: dict) -> dict:
    for path in (local / name, local / f"{name}.default"):
        if path.is_file():
            return json.loads(path.read_text())
    return default


def admit_package(local: str | Path) -> Path:
    """Add :data:`PACKAGE_PREFIX` and :data:`JOB_NVFLARE_CLASSES` to the ``class_allow_list`` of
    ``local/resources.json``.

    The list starts from the site's own (``resources.json``, else ``resources.json.default``),
    else NVFlare's default list; nothing else in the file changes. Returns the file written.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = Path(local)
    resources = _read(local, "resources.json", {"format_version": 2})
    allow = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    allow += [entry for entry in (*JOB_NVFLARE_CLASSES, PACKAGE_PREFIX) if entry not in allow]
    resources["class_allow_list"] = allow
    local.mkdir(parents=True, exist_ok=True)
    path = local / "resources.json"
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


def set_byoc(kit: str | Path, allowed: bool, roles: tuple[str, ...] = ("project_admin",)) -> Path | None:
    """Allow or forbid ``roles`` to run jobs with custom code (``byoc``) at this site.

    Writes ``local/authorization.json`` from the kit's policy (``authorization.json.default``
    as NVFlare generates it); the roles keep every other right, including job submission.
    Returns the file written, or ``None`` if the kit has no authorization policy.
    """
    local = Path(kit) / "local"
    policy = _read(local, "authorization.json", {})
    if not policy:
        return None
    rights_all = ("submit_job", "manage_job", "download_job", "view", "operate", "shell_commands")
    for role in roles:
        rights = policy.setdefault("permissions", {}).get(role, {})
        rights = {r: "any" for r in rights_all} if rights == "any" else dict(rights)
        rights.update({r: rights.get(r, "any") for r in rights_all})
        rights["byoc"] = "any" if allowed else "none"
        policy["permissions"][role] = rights
    path = local / "authorization.json"
    path.write_text(json.dumps(policy, indent=2) + "\n")
    return path
