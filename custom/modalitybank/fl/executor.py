"""The site executor: runs inside a hospital, next to its data.

It loads the site's slices when the run starts (NVFlare's ``START_RUN`` event, as NVFlare's
``LearnerExecutor`` does), keeps one discriminator per modality the site holds resident across
iterations, and per task runs :func:`modalitybank.gan.site_step` on the fakes the server sent. It
returns only gradients w.r.t. those fakes, scalar losses and the masks of its next batch; real
images never leave (and the :mod:`~modalitybank.fl.privacy` guard checks it). What the gradients
may carry is the site's privacy mode (:mod:`modalitybank.dp`), from its own settings. A site whose
set-up or task failed answers with an error code (:data:`~modalitybank.fl.wire.ERROR_CODES`); the
detail stays in its own log.
"""

from __future__ import annotations

import importlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from modalitybank import config
from modalitybank.bank import atomic_save
from modalitybank.dp import PrivacySettings, resolve_privacy
from modalitybank.fl import wire
from modalitybank.fl.privacy import LOSSES_ALLOWED
from modalitybank.fl.site_config import read_site_config, site_state_dir
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, site_step
from modalitybank.resources import bundle_dir
from modalitybank.training import BatchStream, TrainSettings, make_site_models

__all__ = ["SiteExecutor", "error_code", "site_data", "site_seed"]


def site_data(data_root: str, cache_dir: str, scale: str, seed: int) -> tuple[Path, Path]:
    """The site's data folder and slice cache; an empty ``data_root`` means the embedded phantom.

    The phantom is built (once, under a lock) from the installed package: a job that carries its
    code in ``custom/`` ships the runtime only, not the phantom generator, so such a site needs a
    ``data_root``.
    """
    cache = Path(cache_dir) if cache_dir else config.CACHE_ROOT / "slices"
    if data_root:
        return Path(data_root), cache
    default = importlib.import_module("modalitybank.data.default")  # not traced into a job's custom/ code
    return default.default_phantom(scale, seed), cache


def site_seed(site: str, seed: int = 0) -> int:
    """A site's batch-order seed: stable across processes and runs (``hash()`` of a str is not)."""
    return seed + zlib.crc32(site.encode()) % 1000


def error_code(err: BaseException, default: str) -> str:
    """The code a site answers for ``err``: :data:`~modalitybank.fl.wire.ERROR_DATA` for its data's errors,
    else ``default``."""
    from modalitybank.data.brats_cases import BratsDataError

    return wire.ERROR_DATA if isinstance(err, BratsDataError | FileNotFoundError) else default


class SiteExecutor(Executor):
    """One hospital site of a ModalityBank federation.

    Args:
        scale: size preset (slice size, batch size, discriminator width).
        experiment: which modalities each data centre holds (``configs/experiments.json``).
        data_root: the site's BraTS-layout folder; empty: the embedded phantom (built on first use).
        cache_dir: slice cache; empty: next to the shared phantom cache.
        seed: batch order and initialisation.
        checkpoint_every: save the discriminators every so many iterations and at the end of the run (in the
            site's state folder: its workspace root, or ``state_dir`` of its own settings).
        discriminator_bundle: the site-discriminator MONAI bundle its discriminators, optimisers and
            loss weights are built from (absolute, or relative to the job's ``custom/`` folder);
            given as a name, the job's ``custom/<name>`` if the job carries it, else the bundle
            installed with the package; empty: the package's defaults for the preset (the same figures).
        threads: torch threads of this process.
        privacy_mode: the job's fallback privacy mode, ``standard`` or ``adversarial``; the site's own
            settings (``"privacy"`` in ``local/modalitybank_site.json``) win, and ``dp`` can only come from them.
    """

    #: Written into job configs even at their defaults (``FedJob.export_job``), so a job shows them all.
    _always_serialize_args = ("scale", "experiment", "data_root", "cache_dir", "discriminator_bundle", "threads",
                              "privacy_mode")

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", data_root: str = "",
                 cache_dir: str = "", seed: int = 0, checkpoint_every: int = 0, threads: int = 1,
                 discriminator_bundle: str = "", privacy_mode: str = "standard") -> None:
        super().__init__()
        self.scale, self.experiment, self.seed = scale, experiment, seed
        self.data_root, self.cache_dir = data_root, cache_dir
        self.checkpoint_every, self.threads, self.discriminator_bundle = checkpoint_every, threads, discriminator_bundle
        self.privacy_mode = privacy_mode
        self._ready = False
        self._setup_error: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except Exception as err:  # the server's hello is answered with the code; the detail stays here
                self._setup_error = error_code(err, wire.ERROR_SETUP)
                self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} could not start "
                                   f"({self._setup_error}): {type(err).__name__}: {err}")
        elif event_type == EventType.END_RUN and self._ready:
            self._save_discriminators()  # a resumed run continues from the last iteration, not the last multiple

    def _save_discriminators(self) -> None:
        atomic_save({m: {"d": self.model.discriminators[m].state_dict(), "opt": self.model.optimizers[m].state_dict()}
                     for m in self.modalities}, self.checkpoint)

    # -- set-up -----------------------------------------------------------------------------
    def _setup(self, fl_ctx: FLContext) -> None:
        torch.set_num_threads(self.threads)
        self.site = fl_ctx.get_identity_name()
        workspace = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        own = read_site_config(self.site, workspace / "local")  # the site's own settings win over the job's
        self.dataset, where = self._load(own, fl_ctx)
        self.modalities = list(self.dataset.modalities)
        self.settings = TrainSettings.from_preset(self.scale, "bank", seed=self.seed,
                                                  checkpoint_every=self.checkpoint_every or None)
        self.model, self.loss = self._discriminators(fl_ctx)
        self.privacy: PrivacySettings = resolve_privacy(own.get("privacy"), self.privacy_mode,
                                                        min(self.settings.batch_size, len(self.dataset)),
                                                        len(self.modalities))
        #: the loss whose gradient leaves the site (adversarial: no L1 or feature-matching term); the
        #: discriminator's update is the same
        self.returned = self.loss.adversarial_only() if self.privacy.mode == "adversarial" else None
        self.checkpoint = site_state_dir(self.site, own, workspace) / "modalitybank" / f"{self.experiment}-{self.scale}" / "discriminators.pt"
        if self.checkpoint.is_file():
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            for m in self.modalities:
                self.model.discriminators[m].load_state_dict(state[m]["d"])
                self.model.optimizers[m].load_state_dict(state[m]["opt"])
            self.log_info(fl_ctx, f"resumed discriminators from {self.checkpoint}")
        self.stream = BatchStream(self.dataset, self.settings.batch_size, site_seed(self.site, self.seed))
        self.pending: SiteBatch | None = None
        self.log_info(fl_ctx, f"site {self.site} = {where}: {len(self.dataset)} slices of "
                      f"{len(self.dataset.case_ids)} cases, modalities {self.modalities}; privacy "
                      f"{self.privacy.describe()}; code from {Path(__file__).parents[1]}")
        self._ready = True

    def _load(self, own: dict[str, Any], fl_ctx: FLContext) -> tuple[Any, str]:
        """The site's training slices, and where they come from.

        With a ``data_root`` of its own (``local/modalitybank_site.json``) every case in that folder is
        the site's and its modalities are those of its files (:func:`~modalitybank.data.brats.discover_site`;
        a case lacking one is reported and skipped). Otherwise the job's ``data_root`` (or the phantom) is
        split by data centre, as in the paper: the centre of this client's name and its modalities
        come from ``configs/experiments.json``.
        """
        from modalitybank.data.brats import SiteDataset, discover_site, slice_settings

        kw = slice_settings(self.scale)  # the same slices as the single-process reference trains on
        if own.get("data_root"):
            root, cache = site_data(own["data_root"], own.get("cache_dir", self.cache_dir), self.scale, self.seed)
            suffixes = own.get("file_names")
            modalities, cases, skipped, grades = discover_site(root, suffixes)
            for line in skipped:
                self.log_warning(fl_ctx, f"site {self.site}: {line}")
            dataset = SiteDataset(root, None, modalities, split="all", grades=grades, cases=cases, cache_dir=cache,
                                  suffixes=suffixes, **kw)
            return dataset, f"its own folder {root} ({len(skipped)} case(s) skipped)"
        centre = config.centre_of_site(self.site)
        root, cache = site_data(self.data_root, own.get("cache_dir", self.cache_dir), self.scale, self.seed)
        modalities = config.experiment(self.experiment)["sites"][centre]
        return SiteDataset(root, centre, modalities, split="train", cache_dir=cache, **kw), f"centre {centre}"

    def _discriminators(self, fl_ctx: FLContext) -> tuple[SiteModel, GanLoss]:
        """One discriminator and optimiser per modality, from the site-discriminator bundle if given."""
        if not self.discriminator_bundle:
            model = make_site_models({self.site: self.modalities}, config.preset(self.scale)["model"], self.settings)
            return model[self.site], self.settings.gan_loss()
        from modalitybank.bundle.discriminator import site_discriminator_from_bundle

        bundle = Path(self.discriminator_bundle)
        if not bundle.is_absolute():
            carried = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / "custom" / bundle
            bundle = carried if carried.is_dir() else bundle_dir(self.discriminator_bundle)
        built = {m: site_discriminator_from_bundle(bundle, {"scale": self.scale}) for m in self.modalities}
        self.log_info(fl_ctx, f"discriminators built from the bundle {bundle}")
        model = SiteModel({m: b[0] for m, b in built.items()}, {m: b[1] for m, b in built.items()})
        return model, built[self.modalities[0]][2]

    def _next_masks(self) -> np.ndarray:
        self.pending = next(self.stream)
        return wire.encode_masks(self.pending.label, self.pending.brain)

    # -- tasks ------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._setup_error:
            return self._error(self._setup_error)
        code = wire.ERROR_SETUP
        try:
            if not self._ready:
                self._setup(fl_ctx)
            code = wire.ERROR_INTERNAL
            if task_name == wire.TASK_HELLO:
                data = {wire.MODALITIES: self.modalities, wire.NEXT_MASKS: self._next_masks(),
                        wire.SLICES: len(self.dataset), wire.PRIVACY: self.privacy.describe()}
                result = DXO(DataKind.APP_DEFINED, data).to_shareable()
                result.set_header(wire.PRIVACY_HEADER, self.privacy.mode)
                return result
            if task_name == wire.TASK_STEP:
                return self._step(shareable, fl_ctx, abort_signal)
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as err:  # the detail stays in this site's log; the server gets the code
            code = error_code(err, code)
            self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} failed {task_name} ({code}): "
                               f"{type(err).__name__}: {err}")
            return self._error(code)

    @staticmethod
    def _error(code: str) -> Shareable:
        """An error reply carrying one of :data:`~modalitybank.fl.wire.ERROR_CODES`, nothing else."""
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply.set_header(wire.ERROR_HEADER, code if code in wire.ERROR_CODES else wire.ERROR_INTERNAL)
        return reply

    def _step(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        iteration = int(shareable.get_header(wire.ITERATION) or 0)
        data = from_shareable(shareable).data
        if self.pending is None:
            raise RuntimeError("fakes arrived before this site sent any masks")
        batch, out, losses = self.pending, {}, {}
        for m in [m for m in self.modalities if wire.fake_key(m) in data]:  # the server's targets among ours
            sent = data[wire.fake_key(m)]
            if sent.shape[0] != batch.mask.shape[0]:
                raise ValueError(f"fakes for {m} have batch {sent.shape[0]}, the masks sent had {batch.mask.shape[0]}")
            grad, site_losses = site_step(self.model.discriminators[m], self.model.optimizers[m], batch.mask,
                                          batch.reals[m], wire.from_wire(sent), self.loss, self.returned)
            out[wire.grad_key(m)] = wire.to_wire(grad, str(sent.dtype))
            losses |= {f"{m}/{k}": float(v) for k, v in site_losses.items() if k in LOSSES_ALLOWED[self.privacy.mode]}
        self.before_reply(iteration, out, batch, abort_signal)
        out[wire.NEXT_MASKS] = self._next_masks()
        out[wire.LOSSES] = losses
        if iteration % self.settings.checkpoint_every == 0:
            self._save_discriminators()
        result = DXO(DataKind.APP_DEFINED, out).to_shareable()
        result.set_header(wire.ITERATION, iteration)
        result.set_header(wire.PRIVACY_HEADER, self.privacy.mode)
        return result

    def before_reply(self, iteration: int, out: dict[str, Any], batch: SiteBatch, abort_signal: Signal) -> None:
        """Called with a step's result (``out``, editable) before the next masks are added; nothing here.

        The tests' misbehaving sites (``tests/faulty_site.py``) override it to show the guards at work.
        """
