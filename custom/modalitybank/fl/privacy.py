"""The privacy guard: on every site, what leaves is checked against what the protocol allows.

NVFlare's own privacy filters act on model weights only and pass ``APP_DEFINED`` data through, so
these are our own filters. :class:`TaskManifestRecorder` (a task-data filter) notes what the
server sent; :class:`PrivacyGuard` (a task-result filter) passes a result only if it holds the
declared keys, each gradient with exactly the shape and dtype of the fake the server sent, masks
as uint8 mask codes of the batch's size, and only finite values. Everything else is blocked and
logged. Both write the site's :class:`~modalitybank.fl.ledger.Ledger`.
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
from modalitybank.fl import wire
from modalitybank.fl.ledger import Ledger

__all__ = ["PrivacyGuard", "TaskManifestRecorder", "check_result", "ledger_for"]

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


def check_result(task: str, sent: Manifest, result: dict[str, Any]) -> list[str]:
    """Everything wrong with ``result`` as an answer to a task that carried ``sent``; empty if it may leave."""
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
        allowed = {wire.MODALITIES, wire.NEXT_MASKS, wire.SLICES}
        mods = result.get(wire.MODALITIES)
        if not isinstance(mods, list) or not all(m in config.MODALITIES for m in mods):
            problems.append(f"{wire.MODALITIES} must list modality names")
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
    return problems


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
    """Task-result filter: passes only what :func:`check_result` allows; blocks and logs the rest."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task, task_id, _ = _task_info(fl_ctx, shareable)
        with _sent_lock:
            sent, iteration = _sent.pop(task_id, ({}, None))
        site = fl_ctx.get_identity_name()
        ledger = ledger_for(fl_ctx)
        if shareable.get_return_code() != ReturnCode.OK:
            ledger.record(site, "sent", task, {}, iteration, status="error",
                          note=str(shareable.get_return_code()))
            return shareable
        try:
            data = from_shareable(shareable).data or {}
        except Exception:  # not a DXO: nothing of ours may leave that way
            data, problems = {}, ["result is not a DXO"]
        else:
            problems = check_result(task, sent, data)
        if problems:
            note = "; ".join(problems)
            ledger.record(site, "sent", task, data, iteration, status="blocked", note=note)
            self.log_error(fl_ctx, f"privacy guard blocked the result of {task} at iteration {iteration}: {note}")
            reply = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
            reply.set_header(wire.BLOCKED_HEADER, note)
            return reply
        ledger.record(site, "sent", task, data, iteration)
        return shareable
