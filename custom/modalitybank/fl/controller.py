"""The server controller: holds the generator and its bank, learns the bank from the sites.

Per iteration, for every active site at once: make the fakes of the masks the site sent last
(one per modality it holds) and send them as that site's own task; wait; check each returned
gradient (shape, finite, norm) and backpropagate the accepted ones into the bank entries
(:func:`modalitybank.gan.generator_step`, one optimiser step). A site that does not answer within
``site_timeout`` is set aside and probed until it answers again; a site whose result is blocked or
rejected is named in the log; a site that answers with an error is named with its error code (the
detail stays in the site's log), and one that has spent its privacy budget (mode ``dp``) is set aside
for good. Checkpoints every ``checkpoint_every`` iterations; a restarted server resumes from the last one.
"""

from __future__ import annotations

import importlib
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from modalitybank import config
from modalitybank.bank import atomic_save, atomic_write_json
from modalitybank.fl import wire
from modalitybank.fl.ledger import Ledger
from modalitybank.fl.rejoin import refresh_participants
from modalitybank.gan import generator_step
from modalitybank.networks import build_generator, mask_channels
from modalitybank.runlog import RunLog
from modalitybank.store import load_generator, read_info, save_generator
from modalitybank.training import TrainSettings

__all__ = ["RUN_FILE", "STATE_FILE", "ModalityBankController", "check_gradient"]

STATE_FILE = "server_state.pt"
#: What the run trained: status, iterations with accepted gradients, the sites that contributed.
RUN_FILE = "run.json"
#: Seconds between two reads of the job's participants while a site is absent (a restarted site's new token).
_REFRESH_EVERY = 5.0


def check_gradient(grad: torch.Tensor, fake: torch.Tensor, max_norm: float) -> str | None:
    """Why a site's gradient must be rejected, or ``None`` if it is acceptable."""
    if grad.shape != fake.shape:
        return f"gradient shape {tuple(grad.shape)} differs from the fake's {tuple(fake.shape)}"
    if not torch.isfinite(grad).all():
        return f"gradient has {int((~torch.isfinite(grad)).sum())} non-finite values"
    norm = float(grad.norm())
    if norm > max_norm:
        return f"gradient norm {norm:.3g} exceeds the limit {max_norm:.3g}"
    return None


def _wire_bytes(shareable: Shareable) -> int:
    """Size of a message as NVFlare serialises it."""
    from nvflare.fuel.utils import fobs

    return len(fobs.dumps(shareable))


class _Site:
    def __init__(self, name: str) -> None:
        self.name = name
        self.reason = "never answered"  # why the site is not active
        self.modalities: list[str] = []
        self.masks: Any = None  # uint8 codes of the site's next batch
        self.active = False
        self.retired = False  # spent its privacy budget: never asked again
        self.privacy: dict[str, Any] = {"mode": "standard"}
        self.probe: Task | None = None

    def gradient_limit(self, max_norm: float, fake: torch.Tensor) -> float:
        """The norm a gradient of this site may have: ``max_norm``, plus room for the noise of a ``dp`` site
        (its declared per-coordinate std σ·C: the noise's norm is about σ·C·√(numel), 2× that allowed)."""
        return max_norm + 2.0 * float(self.privacy.get("noise_std", 0.0)) * math.sqrt(fake.numel())


class ModalityBankController(Controller):
    """Central generator + bank against per-site discriminators (see module docstring).

    Args:
        scale: size preset (``tiny``, ``small``, ``paper``).
        experiment: ``multimodal`` or ``missing_modality`` (the bank entries to learn).
        iterations: total iterations (0: the preset's ``bank_iterations``).
        baseline: ``""`` (ModalityBank) or ``"asyndgan"`` (one multi-channel generator, no bank).
        pretrained: pre-trained generator folder; empty: pre-train once on the public source set.
        checkpoint_dir: absolute, or relative to the job's run directory.
        checkpoint_every: iterations between checkpoints (0: the preset's).
        min_sites: how many sites must join for the run to start (0: every client of the job).
            Fewer within ``join_timeout``, or every site gone later, fails the job with each
            site's reason.
        site_timeout: seconds to wait for a site's answer to an iteration before going on without it.
        join_timeout: seconds to wait for the sites to join at the start (loading their data).
        max_grad_norm: a site's gradient with a larger norm is rejected.
        wire_dtype: ``float32`` or ``float16`` for fakes and gradients.
        task_check_period: how often the communicator checks tasks (seconds).
        seed: initialisation.
        resume_from: a finished generator folder (a checkpoint) to continue from: its base and entries
            are loaded, and only ``add_modalities`` (plus, with ``keep_learning``, its entries of the
            experiment's targets) are learned. Entries not learned are copied unchanged (bit-identical).
        add_modalities: comma-separated new bank entries to learn (with ``resume_from``), e.g. ``"t1"``.
        keep_learning: with ``resume_from``, the existing entries of the experiment's targets learn on too
            (a hospital joining with modalities the bank has); else they stay frozen.
        threads: torch threads of the server process (0: all cores). While the server makes the fakes and
            backpropagates, every site waits for its answer, so the server may use the whole machine even when
            the sites share it (the simulator, POC): 1 thread made an iteration 1.6× slower on 2 cores.
        measure_wire_bytes: record in the server ledger the serialised size of every message
            (what NVFlare sends), for ``modalitybank bench fl``.
    """

    #: Written into job configs even at their defaults (``FedJob.export_job``), so a job shows them all.
    _always_serialize_args = ("scale", "experiment", "iterations", "baseline", "pretrained", "checkpoint_dir",
                              "min_sites", "site_timeout", "join_timeout", "max_grad_norm", "wire_dtype",
                              "resume_from", "add_modalities", "keep_learning")

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", iterations: int = 0, baseline: str = "",
                 pretrained: str = "", checkpoint_dir: str = "checkpoint", checkpoint_every: int = 0,
                 min_sites: int = 0, site_timeout: float = 120.0, join_timeout: float = 900.0,
                 max_grad_norm: float = 1e4, wire_dtype: str = "float32", task_check_period: float = 0.01,
                 seed: int = 0, resume_from: str = "", add_modalities: str = "", keep_learning: bool = False,
                 threads: int = 0, measure_wire_bytes: bool = False) -> None:
        super().__init__(task_check_period=task_check_period)
        if wire_dtype not in ("float32", "float16"):
            raise ValueError(f"wire_dtype must be float32 or float16, not {wire_dtype!r}")
        if baseline not in ("", "asyndgan"):
            raise ValueError(f"baseline must be '' (ModalityBank) or 'asyndgan', not {baseline!r}")
        self.scale, self.experiment, self.iterations, self.baseline = scale, experiment, iterations, baseline
        self.pretrained, self.checkpoint_dir, self.checkpoint_every = pretrained, checkpoint_dir, checkpoint_every
        self.min_sites, self.site_timeout, self.join_timeout = min_sites, site_timeout, join_timeout
        self.max_grad_norm, self.wire_dtype, self.seed = max_grad_norm, wire_dtype, seed
        self.threads, self.measure_wire_bytes = threads, measure_wire_bytes
        self.resume_from, self.add_modalities, self.keep_learning = resume_from, add_modalities, keep_learning
        if add_modalities and not resume_from:
            raise ValueError("add_modalities needs resume_from: the generator whose bank gets the new entries")
        self.settings = TrainSettings.from_preset(scale, "bank", seed=seed, iterations=iterations or None,
                                                  checkpoint_every=checkpoint_every or None)
        self._results: dict[tuple[str, str, int], Shareable] = {}
        self._results_lock = threading.Lock()
        self._refreshed = 0.0

    # -- life cycle -------------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        self.communicator._task_check_period = self._task_check_period  # 2.9 reads this attribute only
        if self.threads:
            torch.set_num_threads(self.threads)
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        self.ckpt = Path(self.checkpoint_dir) if Path(self.checkpoint_dir).is_absolute() else run_dir / self.checkpoint_dir
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(run_dir / wire.LEDGER_FILE)
        self.targets = list(config.experiment(self.experiment)["targets"])
        self.frozen: list[str] = []  # entries of resume_from kept as they are
        self._build_generator(fl_ctx)

    def _build_generator(self, fl_ctx: FLContext) -> None:
        state_path = self.ckpt / STATE_FILE
        state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.is_file() else None
        previous = read_info(self.resume_from) if self.resume_from else {}
        if self.resume_from:
            self._resume_targets(previous)
        if state is not None:
            self.generator = load_generator(self.ckpt)
        elif self.resume_from:
            self.generator = load_generator(self.resume_from)
            (self.ckpt / "entries").mkdir(parents=True, exist_ok=True)
            for name in self.frozen:  # byte for byte: what the bank already holds does not change
                shutil.copyfile(Path(self.resume_from) / "entries" / f"{name}.pt", self.ckpt / "entries" / f"{name}.pt")
            self.log_info(fl_ctx, f"continuing the bank of {self.resume_from}: learning {self.targets}, "
                          f"frozen {self.frozen}")
        elif self.baseline == "asyndgan":
            torch.manual_seed(self.seed)
            self.generator = build_generator(config.preset(self.scale)["model"], output_modalities=self.targets)
        else:
            source = self.pretrained
            if not source:  # imported here only: the default pre-training needs the installed package
                source = str(importlib.import_module("modalitybank.data.default").default_pretrained(self.scale, self.seed))
            self.log_info(fl_ctx, f"bank entries {self.targets} on the generator pre-trained in {source}")
            self.generator = load_generator(source)
        modulated = self.generator.config["modulated"]
        self.optimizer = self.settings.adam(self.generator.bank.learn(self.targets) if modulated
                                            else list(self.generator.parameters()))
        self.start, self.contributions, self.entry_sites = 0, {}, {}
        if state is not None:
            self.optimizer.load_state_dict(state["g_opt"])
            self.start, self.contributions = state["iteration"], dict(state.get("contributions", {}))
            self.entry_sites = dict(state.get("entry_sites", {}))
            self.log_info(fl_ctx, f"resumed from the checkpoint in {self.ckpt} at iteration {self.start}")
        self.meta = {"stage": "federated", "experiment": self.experiment, "scale": self.scale,
                     "image_size": config.preset(self.scale)["slices"]["image_size"],
                     "baseline": self.baseline or None, "provenance": dict(previous.get("provenance", {}))}
        if self.resume_from:
            self.meta["resumed_from"] = str(self.resume_from)

    def _resume_targets(self, previous: dict[str, Any]) -> None:
        """With ``resume_from``: the entries to learn (the new ones, and with ``keep_learning`` the
        experiment's existing ones) and those kept frozen."""
        have = list(previous.get("modalities", []))
        new = [m.strip() for m in self.add_modalities.split(",") if m.strip()]
        unknown = [m for m in new if m not in config.MODALITIES]
        if unknown or [m for m in new if m in have]:
            raise ValueError(f"add_modalities {new}: must be modalities of {list(config.MODALITIES)} that "
                             f"{self.resume_from} does not hold yet (it holds {have})")
        kept = [m for m in self.targets if m in have] if self.keep_learning else []
        self.targets = new + kept
        if not self.targets:
            raise ValueError(f"nothing to learn from {self.resume_from}: name add_modalities or keep_learning")
        self.frozen = [m for m in have if m not in self.targets]

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext) -> None:
        self.log_warning(fl_ctx, f"late result of {task_name} from {client.name} ignored")

    # -- messaging --------------------------------------------------------------------------
    def _on_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        key = (client_task.client.name, client_task.task.name, client_task.task.props["iteration"])
        if self.measure_wire_bytes:
            client_task.result.set_header("wire_bytes", _wire_bytes(client_task.result))
        with self._results_lock:
            self._results[key] = client_task.result

    def _take(self, site: str, task: str, iteration: int) -> Shareable | None:
        with self._results_lock:
            return self._results.pop((site, task, iteration), None)

    def _send(self, site: _Site, name: str, data: dict[str, Any], iteration: int, fl_ctx: FLContext,
              timeout: float | None = None) -> Task:
        shareable = DXO(DataKind.APP_DEFINED, data).to_shareable()
        shareable.set_header(wire.ITERATION, iteration)
        task = Task(name, shareable, props={"iteration": iteration}, timeout=int(timeout or self.site_timeout),
                    result_received_cb=self._on_result)
        extra = {"wire_bytes": _wire_bytes(shareable)} if self.measure_wire_bytes else {}
        self.ledger.record(site.name, "sent", name, data, iteration, extra=extra)
        self.broadcast(task, fl_ctx, targets=[site.name], min_responses=1)
        return task

    def _problem(self, result: Shareable | None) -> str | None:
        """Why a result is unusable (named in the log), or ``None``."""
        if result is None:
            return "no answer in time"
        rc = result.get_return_code()
        if rc != ReturnCode.OK:
            reason = result.get_header(wire.BLOCKED_HEADER) or result.get_header(wire.ERROR_HEADER) or ""
            return f"{rc}{': ' + reason if reason else ''}"
        return None

    def _hello_result(self, site: _Site, result: Shareable, iteration: int, fl_ctx: FLContext) -> None:
        data = from_shareable(result).data
        self.ledger.record(site.name, "received", wire.TASK_HELLO, data, iteration)
        site.modalities = [m for m in data[wire.MODALITIES] if m in self.targets]
        site.masks = data[wire.NEXT_MASKS]
        site.active = True
        site.privacy = dict(data.get(wire.PRIVACY) or {"mode": "standard"})
        self.log_info(fl_ctx, f"site {site.name} joined: {data[wire.SLICES]} slices, modalities {site.modalities}, "
                      f"privacy {site.privacy}")

    # -- the loop ---------------------------------------------------------------------------
    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = {c.name: _Site(c.name) for c in self._engine.get_clients()}
        if not self._join(sites, abort_signal, fl_ctx):
            return
        total, t0 = self.settings.iterations, time.perf_counter()
        with RunLog(self.ckpt, self.start) as log:
            for iteration in range(self.start, total):
                if abort_signal.triggered:
                    return
                if not any(s.active for s in sites.values()) and all(s.retired for s in sites.values()):
                    self.log_info(fl_ctx, f"every site has spent its privacy budget: stopping before iteration "
                                  f"{iteration + 1} of {total}")
                    total = iteration
                    break
                if not any(s.active for s in sites.values()) and not self._wait_for_return(sites, iteration,
                                                                                           abort_signal, fl_ctx):
                    self._fail(fl_ctx, f"every site dropped out before iteration {iteration + 1}: "
                               + "; ".join(f"{s.name}: {s.reason}" for s in sites.values()), iteration)
                    return
                t_iter = time.perf_counter()
                report = self._iteration(sites, iteration, abort_signal, fl_ctx)
                t_iter = time.perf_counter() - t_iter
                if report:
                    for name in {key.split("/")[0] for key in report}:
                        self.contributions[name] = self.contributions.get(name, 0) + 1
                    for key in report:
                        name, modality = key.split("/")
                        counts = self.entry_sites.setdefault(modality, {})
                        counts[name] = counts.get(name, 0) + 1
                    mean = log.write(iteration + 1, report, seconds=round(t_iter, 4))
                    rate = (time.perf_counter() - t0) / (iteration + 1 - self.start)
                    self.log_info(fl_ctx, f"iteration {iteration + 1}/{total} | {rate:.2f} s/it | ETA "
                                  f"{rate * (total - iteration - 1):.0f} s | d {mean['d']:.3f} g_l1 {mean['g_l1']:.3f}"
                                  f" | sites {sorted(s.name for s in sites.values() if s.active)}")
                if (iteration + 1) % self.settings.checkpoint_every == 0:
                    self._checkpoint(iteration + 1)
        self._checkpoint(total)
        summary = self._summary(total)
        if not summary["accepted_iterations"]:
            self._fail(fl_ctx, f"no iteration of {self.start + 1}..{total} had an accepted gradient", total)
            return
        self.log_info(fl_ctx, f"done: {summary['accepted_iterations']} of {total} iterations with accepted "
                      f"gradients, from {summary['sites']}; generator in {self.ckpt}")

    def _join(self, sites: dict[str, _Site], abort_signal: Signal, fl_ctx: FLContext) -> bool:
        """Send every site the hello; True if at least ``min_sites`` joined, else the job fails."""
        hellos = {name: self._send(site, wire.TASK_HELLO, {}, self.start, fl_ctx, self.join_timeout)
                  for name, site in sites.items()}
        for name, task in hellos.items():
            self.communicator.wait_for_task(task, abort_signal)
            result = self._take(name, wire.TASK_HELLO, self.start)
            problem = self._problem(result)
            if problem:
                sites[name].reason = problem
                self.log_error(fl_ctx, f"site {name} could not join: {problem}")
            else:
                self._hello_result(sites[name], result, self.start, fl_ctx)
        joined = sorted(s.name for s in sites.values() if s.active)
        needed = self.min_sites or len(sites)
        if len(joined) < needed:
            self._fail(fl_ctx, f"{len(joined)} of {len(sites)} sites joined within {self.join_timeout:.0f} s, "
                       f"{needed} needed (min_sites); " + "; ".join(
                           f"{s.name}: {s.reason}" for s in sites.values() if not s.active), self.start)
            return False
        return True

    def _wait_for_return(self, sites: dict[str, _Site], iteration: int, abort_signal: Signal,
                         fl_ctx: FLContext) -> bool:
        """No site is active: probe them all for up to ``site_timeout``; True as soon as one is back."""
        end = time.time() + self.site_timeout
        while time.time() < end and not abort_signal.triggered:
            self._probe_absent(sites, iteration, fl_ctx)
            if any(s.active for s in sites.values()):
                return True
            time.sleep(0.2)
        return False

    def _summary(self, iteration: int, status: str = "completed", reason: str = "") -> dict[str, Any]:
        """What the run trained, as ``run.json`` in the checkpoint folder says it."""
        summary = {"status": status, "iterations": iteration, "accepted_iterations": self._accepted(),
                   "sites": sorted(self.contributions), "site_iterations": dict(sorted(self.contributions.items()))}
        if reason:
            summary["reason"] = reason
        atomic_write_json(summary, self.ckpt / RUN_FILE)
        return summary

    def _accepted(self) -> int:
        path = self.ckpt / "metrics.jsonl"
        return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0

    def _fail(self, fl_ctx: FLContext, reason: str, iteration: int) -> None:
        """End the job as failed, naming why (``nvflare simulator`` then exits non-zero, a job's status is not
        FINISHED:COMPLETED)."""
        self._summary(iteration, status="failed", reason=reason)
        self.log_error(fl_ctx, f"run failed: {reason}")
        self.system_panic(f"ModalityBank: {reason}", fl_ctx)

    def _iteration(self, sites: dict[str, _Site], iteration: int, abort_signal: Signal,
                   fl_ctx: FLContext) -> dict[str, dict[str, float]]:
        self._probe_absent(sites, iteration, fl_ctx)
        self.generator.train()
        sent: dict[str, tuple[Task, dict[str, torch.Tensor]]] = {}
        taking_part = [site for site in sites.values() if site.active and site.modalities]
        masks = {site.name: mask_channels(*wire.decode_masks(site.masks)) for site in taking_part}
        all_site_fakes = self.generator.generate_for_sites(masks, {s.name: s.modalities for s in taking_part})
        for site in taking_part:
            fakes = all_site_fakes[site.name]
            payload = {wire.fake_key(m): wire.to_wire(f, self.wire_dtype) for m, f in fakes.items()}
            sent[site.name] = (self._send(site, wire.TASK_STEP, payload, iteration, fl_ctx), fakes)
        all_fakes, all_grads, report = [], [], {}
        for name, (task, fakes) in sent.items():
            self.communicator.wait_for_task(task, abort_signal)
            site, result = sites[name], self._take(name, wire.TASK_STEP, iteration)
            problem = self._problem(result)
            if problem:
                self.ledger.record(name, "received", wire.TASK_STEP, {}, iteration, status="missing", note=problem)
                others = sorted(s.name for s in sites.values() if s.active and s.name != name)
                if problem.endswith(wire.ERROR_BUDGET_SPENT):
                    self.log_error(fl_ctx, f"site {name} has spent its privacy budget at iteration {iteration + 1} "
                                   f"({site.privacy}); it contributes no more; going on with {others}")
                    site.retired = True
                else:
                    self.log_error(fl_ctx, f"site {name} at iteration {iteration + 1}: {problem}; going on with {others}")
                site.active, site.reason = False, f"at iteration {iteration + 1}: {problem}"
                continue
            data = from_shareable(result).data
            wire_bytes = result.get_header("wire_bytes")
            self.ledger.record(name, "received", wire.TASK_STEP, data, iteration,
                               extra={"wire_bytes": wire_bytes} if wire_bytes else None)
            grads = {m: wire.from_wire(data[wire.grad_key(m)]) for m in fakes}
            rejected = {m: r for m, f in fakes.items()
                        if (r := check_gradient(grads[m], f, site.gradient_limit(self.max_grad_norm, f)))}
            if rejected:
                self.log_error(fl_ctx, f"site {name} at iteration {iteration + 1}: rejected {rejected}")
            for m, fake in fakes.items():
                if m not in rejected:
                    all_fakes.append(fake)
                    all_grads.append(grads[m])
                    losses = data[wire.LOSSES]
                    report[f"{name}/{m}"] = {k: losses[f"{m}/{k}"] for k in ("d", "g_adv", "g_l1", "g_fm", "g")
                                             if f"{m}/{k}" in losses}  # a site's privacy mode may hold some back
            site.masks = data[wire.NEXT_MASKS]
        if all_fakes:
            generator_step(self.optimizer, all_fakes, all_grads)
        return report

    def _probe_absent(self, sites: dict[str, _Site], iteration: int, fl_ctx: FLContext) -> None:
        """Ask every absent site to join again; take back those that answered (without waiting).

        While a site is absent, the participants are read again from the server's parent process every
        ``_REFRESH_EVERY`` seconds: a site whose client crashed and was started again has a new token there
        (:mod:`modalitybank.fl.rejoin`)."""
        absent = [s for s in sites.values() if not s.active and not s.retired]
        if absent and time.time() - self._refreshed > _REFRESH_EVERY:
            self._refreshed = time.time()
            refresh_participants(self._engine, fl_ctx.get_job_id())
        for site in absent:
            if site.probe is not None and site.probe.completion_status is not None:
                result = self._take(site.name, wire.TASK_HELLO, site.probe.props["iteration"])
                site.probe = None
                if self._problem(result) is None:
                    self._hello_result(site, result, iteration, fl_ctx)
                    self.log_info(fl_ctx, f"site {site.name} is back at iteration {iteration + 1}")
                    continue
            if site.probe is None:
                site.probe = self._send(site, wire.TASK_HELLO, {}, iteration, fl_ctx)

    def _checkpoint(self, iteration: int) -> None:
        for modality, sites in self.entry_sites.items():  # which sites and iterations made each entry
            self.meta["provenance"][modality] = {"sites": dict(sorted(sites.items())), "job_experiment": self.experiment,
                                                 "learned_from": str(self.resume_from or self.pretrained or "default")}
        learned = self.targets if self.generator.config["modulated"] else None
        save_generator(self.generator, self.ckpt, self.meta, modalities=learned)
        atomic_save({"iteration": iteration, "g_opt": self.optimizer.state_dict(), "contributions": self.contributions,
                     "entry_sites": self.entry_sites}, self.ckpt / STATE_FILE)
        self._summary(iteration, status="running" if iteration < self.settings.iterations else "completed")
