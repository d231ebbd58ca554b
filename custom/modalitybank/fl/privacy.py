"""The privacy guard: on every site, what leaves is checked against what the protocol allows.

NVFlare's own privacy filters act on model weights only and pass ``APP_DEFINED`` data through (and
its percentile / SVT filters are not differential privacy), so these are our own filters.
:class:`TaskManifestRecorder` (a task-data filter) notes what the server sent; :class:`PrivacyGuard`
(a task-result filter) passes a result only if it holds the declared keys, each gradient with
exactly the shape and dtype of the fake the server sent, masks as uint8 mask codes of the batch's
size, only finite values, and only what the site's privacy mode (:mod:`modalitybank.dp`, from the
site's own settings) lets leave; in mode ``dp`` it clips and noises every example's gradient and
keeps the (ε, δ) budget, refusing the step that would exceed it. Error replies leave with an error
code only. Everything else is blocked and logged. Both filters write the site's
:class:`~modalitybank.fl.ledger.Ledger`, every reply included.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from modalitybank import config
from modalitybank.dp import MODES, PrivacyBudgetSpent, SiteSanitizer, resolve_privacy
from modalitybank.fl import wire
from modalitybank.fl.ledger import Ledger
from modalitybank.fl.site_config import read_site_config, site_state_dir

__all__ = ["LOSSES_ALLOWED", "PRIVACY_STATE_DIR", "PrivacyGuard", "TaskManifestRecorder", "check_result",
           "error_reply", "ledger_for"]

#: Which losses (``<modality>/<name>``) may leave in each privacy mode: none computed on real images in
#: ``dp`` (they would not be accounted), no L1 or feature-matching loss (nor the total, which holds them) in
#: ``adversarial``.
LOSSES_ALLOWED = {"standard": ("d", "g_adv", "g_l1", "g_fm", "g"), "adversarial": ("d", "g_adv"), "dp": ()}
#: Where a site keeps the steps it released in mode ``dp`` (in its state folder, across jobs and restarts).
PRIVACY_STATE_DIR = "modalitybank_privacy"

Manifest = dict[str, tuple[tuple[int, ...], str]]
_sent: dict[str, tuple[Manifest, int | None]] = {}  # task id -> what the server sent (arrays), iteration
_sent_lock = threading.Lock()


def _manifest(data: dict[str, Any]) -> Manifest:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in data.items() if isinstance(v, np.ndarray)}


def _check_masks(value: Any, shape: tuple[int, ...] | None) -> str | None:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3:
        return f"{wire.NEXT_MASKS} must be a (N, H, W) uint8 array"
    if shape is not None and value.shape != shape:
        return f"{wire.NEXT_MASKS} has shape {value.shape}, the batch is {shape}"
    bad = set(np.unique(value).tolist()) - wire.MASK_CODES
    return f"{wire.NEXT_MASKS} holds values {sorted(bad)[:5]} that are not mask codes" if bad else None


def check_result(task: str, sent: Manifest, result: dict[str, Any], mode: str = "standard") -> list[str]:
    """Everything wrong with ``result`` as an answer to a task that carried ``sent``, from a site in privacy
    ``mode``; empty if it may leave."""
    problems = []
    if task == wire.TASK_STEP:
        fakes = {wire.modality_of(k): v for k, v in sent.items() if k.startswith("fake/")}
        allowed = {wire.grad_key(m) for m in fakes} | {wire.NEXT_MASKS, wire.LOSSES}
        batch = next(iter(fakes.values()))[0] if fakes else None
        for m, (shape, dtype) in fakes.items():
            grad = result.get(wire.grad_key(m))
            if not isinstance(grad, np.ndarray):
                problems.append(f"{wire.grad_key(m)} missing")
            elif tuple(grad.shape) != shape or str(grad.dtype) != dtype:
                problems.append(f"{wire.grad_key(m)} is {tuple(grad.shape)} {grad.dtype}, the fake sent was {shape} {dtype}")
            elif not np.isfinite(grad).all():
                problems.append(f"{wire.grad_key(m)} has {int((~np.isfinite(grad)).sum())} non-finite values")
        mask_shape = (batch[0], batch[2], batch[3]) if batch else None
    elif task == wire.TASK_HELLO:
        allowed = {wire.MODALITIES, wire.NEXT_MASKS, wire.SLICES, wire.PRIVACY}
        mods = result.get(wire.MODALITIES)
        if not isinstance(mods, list) or not all(m in config.MODALITIES for m in mods):
            problems.append(f"{wire.MODALITIES} must list modality names")
        privacy = result.get(wire.PRIVACY, {"mode": mode})
        if not isinstance(privacy, dict) or privacy.get("mode") != mode or not all(
                isinstance(v, str | float | int) for v in privacy.values()):
            problems.append(f"{wire.PRIVACY} must describe the site's mode {mode!r}")
        if not isinstance(result.get(wire.SLICES), int):
            problems.append(f"{wire.SLICES} must be an int")
        mask_shape = None
    else:
        return [f"unknown task {task!r}"]
    extra = sorted(set(result) - allowed)
    if extra:
        problems.append(f"undeclared keys {extra}")
    if wire.NEXT_MASKS in result:
        problem = _check_masks(result[wire.NEXT_MASKS], mask_shape)
        if problem:
            problems.append(problem)
    losses = result.get(wire.LOSSES, {})
    if not isinstance(losses, dict) or not all(
            isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in losses.items()):
        problems.append(f"{wire.LOSSES} must map names to finite floats")
    elif mode not in LOSSES_ALLOWED:
        problems.append(f"unknown privacy mode {mode!r}")
    else:
        banned = sorted(k for k in losses if k.rsplit("/", 1)[-1] not in LOSSES_ALLOWED[mode])
        if banned:
            problems.append(f"losses {banned[:4]} may not leave a site in privacy mode {mode}")
    return problems


def error_reply(return_code: str, code: str | None) -> Shareable:
    """A fresh error reply with only an error code (anything not in :data:`~modalitybank.fl.wire.ERROR_CODES`
    becomes ``internal``): no exception text or path leaves the site."""
    reply = make_reply(return_code)
    reply.set_header(wire.ERROR_HEADER, code if code in wire.ERROR_CODES else wire.ERROR_INTERNAL)
    return reply


_ledgers: dict[Path, Ledger] = {}


def ledger_for(fl_ctx: FLContext) -> Ledger:
    """The site's ledger for this job, in the job's run directory (one object per file)."""
    engine = fl_ctx.get_engine()
    path = Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id())) / wire.LEDGER_FILE
    with _sent_lock:
        if path not in _ledgers:
            _ledgers[path] = Ledger(path)
        return _ledgers[path]


def _task_info(fl_ctx: FLContext, shareable: Shareable) -> tuple[str, str, int | None]:
    task_name = fl_ctx.get_prop(FLContextKey.TASK_NAME, "")
    task_id = fl_ctx.get_prop(FLContextKey.TASK_ID, "")
    iteration = shareable.get_header(wire.ITERATION)
    return task_name, task_id, iteration


class TaskManifestRecorder(Filter):
    """Task-data filter: remembers what the server sent for each task and writes it to the ledger."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task, task_id, iteration = _task_info(fl_ctx, shareable)
        data = from_shareable(shareable).data or {}
        with _sent_lock:
            _sent[task_id] = (_manifest(data), iteration)
        ledger_for(fl_ctx).record(fl_ctx.get_identity_name(), "received", task, data, iteration)
        return shareable


class PrivacyGuard(Filter):
    """Task-result filter: passes only what :func:`check_result` allows for the site's privacy mode, applies
    the ``dp`` sanitiser, and reduces error replies to their code; blocks and logs the rest.

    The mode is the site's own (``"privacy"`` in its ``local/modalitybank_site.json``, see
    :mod:`modalitybank.fl.site_config`); without one, the mode the executor declares (the job's fallback,
    ``standard`` or ``adversarial``). A result the executor computed for another mode than the site's is
    blocked. In ``dp`` every example's gradient is clipped and noised here, whatever the executor did.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sanitizers: dict[tuple[str, int, int], SiteSanitizer] = {}
        self._own_settings: dict[str, tuple[Any, str | None]] = {}
        self._state_dirs: dict[str, Path] = {}  # where each site keeps what it spent (read with its settings)
        self._lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task, task_id, _ = _task_info(fl_ctx, shareable)
        with _sent_lock:
            sent, iteration = _sent.pop(task_id, ({}, None))
        site = fl_ctx.get_identity_name()
        ledger = ledger_for(fl_ctx)
        if shareable.get_return_code() != ReturnCode.OK:
            rc = shareable.get_return_code()
            reply = error_reply(rc, shareable.get_header(wire.ERROR_HEADER) or shareable.get_header(wire.BLOCKED_HEADER))
            ledger.record(site, "sent", task, {}, iteration, status="error",
                          note=f"{rc}: {reply.get_header(wire.ERROR_HEADER)}")
            return reply
        problems: list[str] = []
        try:
            data = from_shareable(shareable).data or {}
        except Exception:  # not a DXO: nothing of ours may leave that way
            data, problems = {}, ["result is not a DXO"]
        declared = shareable.get_header(wire.PRIVACY_HEADER) or "standard"
        mode, own = declared, None
        try:
            own, own_mode = self._own(site, fl_ctx)
            mode = own_mode or declared
        except ValueError as err:
            problems.append(f"the site's privacy settings are invalid: {err}")
        if not problems:
            if declared != mode:
                problems.append(f"the result was computed for privacy mode {declared!r}, the site's setting is {mode!r}")
            elif mode == "dp" and not own:
                problems.append("privacy mode dp needs the site's own settings (its budget)")
            else:
                problems = check_result(task, sent, data, mode)
        if problems:
            note = "; ".join(problems)
            ledger.record(site, "sent", task, data, iteration, status="blocked", note=note)
            self.log_error(fl_ctx, f"privacy guard blocked the result of {task} at iteration {iteration}: {note}")
            reply = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
            reply.set_header(wire.BLOCKED_HEADER, note)
            return reply
        extra: dict[str, Any] = {"privacy_mode": mode}
        if mode == "dp":
            grads = {k: v for k, v in data.items() if k.startswith("grad/")}
            batch = next(iter(grads.values())).shape[0] if grads else len(data[wire.NEXT_MASKS])
            sanitizer = self._sanitizer(site, own, batch, len(grads) or len(data.get(wire.MODALITIES, [])), fl_ctx)
            try:
                if task == wire.TASK_STEP:
                    data |= sanitizer.sanitize(grads)
                else:
                    sanitizer.check_budget()
            except PrivacyBudgetSpent as err:
                self.log_error(fl_ctx, f"site {site} stops contributing: {err}")
                reply = error_reply(ReturnCode.EXECUTION_EXCEPTION, wire.ERROR_BUDGET_SPENT)
                ledger.record(site, "sent", task, {}, iteration, status="error",
                              note=f"{ReturnCode.EXECUTION_EXCEPTION}: {wire.ERROR_BUDGET_SPENT}", extra=extra)
                return reply
            extra |= {"epsilon_spent": round(sanitizer.epsilon(), 6), "dp_steps": sanitizer.steps}
            if task == wire.TASK_HELLO:
                data[wire.PRIVACY] = sanitizer.settings.describe() | {"epsilon_spent": extra["epsilon_spent"]}
            dxo = from_shareable(shareable)
            dxo.data = data
            dxo.update_shareable(shareable)
        ledger.record(site, "sent", task, data, iteration, extra=extra)
        return shareable

    def _own(self, site: str, fl_ctx: FLContext) -> tuple[Any, str | None]:
        """The site's own privacy settings and mode (``None``: it has none), read and checked once per site."""
        with self._lock:
            if site not in self._own_settings:
                settings = read_site_config(site, _workspace(fl_ctx) / "local")
                self._state_dirs[site] = site_state_dir(site, settings, _workspace(fl_ctx))
                own = settings.get("privacy")
                self._own_settings[site] = (own, resolve_privacy(own).mode if own else None)
            return self._own_settings[site]

    def _sanitizer(self, site: str, own: dict[str, Any], batch: int, modalities: int,
                   fl_ctx: FLContext) -> SiteSanitizer:
        """The site's sanitizer (after :meth:`_own` read its settings)."""
        with self._lock:
            key = (site, batch, modalities)
            if key not in self._sanitizers:
                settings = resolve_privacy(own, batch_size=batch, modalities=modalities)
                path = self._state_dirs[site] / PRIVACY_STATE_DIR / f"{site}.json"
                self._sanitizers[key] = SiteSanitizer(settings, path)
                self.log_info(fl_ctx, f"site {site}: privacy mode dp, {settings.describe()}; accounted noise "
                              f"multiplier {settings.accounted_noise_multiplier:.3f} per step (sampling rate 1); "
                              f"ε spent so far {self._sanitizers[key].epsilon():.3f}")
            return self._sanitizers[key]


def _workspace(fl_ctx: FLContext) -> Path:
    return Path(fl_ctx.get_engine().get_workspace().get_root_dir())


assert set(LOSSES_ALLOWED) == set(MODES)
