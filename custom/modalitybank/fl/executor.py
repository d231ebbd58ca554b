"""The site executor: runs inside a hospital, next to its data.

It loads the site's slices when the run starts (NVFlare's ``START_RUN`` event, as NVFlare's
``LearnerExecutor`` does), keeps one discriminator per modality the site holds resident across
iterations, and per task runs :func:`modalitybank.gan.site_step` on the fakes the server sent. It
returns only gradients w.r.t. those fakes, scalar losses and the masks of its next batch; real
images never leave (and the :mod:`~modalitybank.fl.privacy` guard checks it). A site whose set-up
failed answers the server's hello with the reason, so the server can name it.
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
from modalitybank.fl import wire
from modalitybank.fl.site_config import read_site_config
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, site_step
from modalitybank.resources import bundle_dir
from modalitybank.training import BatchStream, TrainSettings, make_site_models

__all__ = ["SiteExecutor", "site_data", "site_seed"]


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


class SiteExecutor(Executor):
    """One hospital site of a ModalityBank federation.

    Args:
        scale: size preset (slice size, batch size, discriminator width).
        experiment: which modalities each data centre holds (``configs/experiments.json``).
        data_root: the site's BraTS-layout folder; empty: the embedded phantom (built on first use).
        cache_dir: slice cache; empty: next to the shared phantom cache.
        seed: batch order and initialisation.
        checkpoint_every: save the discriminators every so many iterations (in the site's workspace).
        discriminator_bundle: the site-discriminator MONAI bundle its discriminators, optimisers and
            loss weights are built from (absolute, or relative to the job's ``custom/`` folder);
            given as a name, the job's ``custom/<name>`` if the job carries it, else the bundle
            installed with the package; empty: the package's defaults for the preset (the same figures).
        threads: torch threads of this process.
    """

    #: Written into job configs even at their defaults (``FedJob.export_job``), so a job shows them all.
    _always_serialize_args = ("scale", "experiment", "data_root", "cache_dir", "discriminator_bundle", "threads")

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", data_root: str = "",
                 cache_dir: str = "", seed: int = 0, checkpoint_every: int = 0, threads: int = 1,
                 discriminator_bundle: str = "") -> None:
        super().__init__()
        self.scale, self.experiment, self.seed = scale, experiment, seed
        self.data_root, self.cache_dir = data_root, cache_dir
        self.checkpoint_every, self.threads, self.discriminator_bundle = checkpoint_every, threads, discriminator_bundle
        self._ready = False
        self._setup_error: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except Exception as err:  # answered to the server's hello, which names the site and the reason
                self._setup_error = f"{type(err).__name__}: {err}"
                self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} could not start: {err}")

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
        self.checkpoint = workspace / "modalitybank" / f"{self.experiment}-{self.scale}" / "discriminators.pt"
        if self.checkpoint.is_file():
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            for m in self.modalities:
                self.model.discriminators[m].load_state_dict(state[m]["d"])
                self.model.optimizers[m].load_state_dict(state[m]["opt"])
            self.log_info(fl_ctx, f"resumed discriminators from {self.checkpoint}")
        self.stream = BatchStream(self.dataset, self.settings.batch_size, site_seed(self.site, self.seed))
        self.pending: SiteBatch | None = None
        self.log_info(fl_ctx, f"site {self.site} = {where}: {len(self.dataset)} slices of "
                      f"{len(self.dataset.case_ids)} cases, modalities {self.modalities}; code from "
                      f"{Path(__file__).parents[1]}")
        self._ready = True

    def _load(self, own: dict[str, Any], fl_ctx: FLContext) -> tuple[Any, str]:
        """The site's training slices, and where they come from.

        With a ``data_root`` of its own (``local/modalitybank_site.json``) every case in that folder is
        the site's and its modalities are those of its files (:func:`~modalitybank.data.brats.discover_site`;
        a case lacking one is reported and skipped). Otherwise the job's ``data_root`` (or the phantom) is
        split by data centre, as in the paper: the centre of this client's name and its modalities
        come from ``configs/experiments.json``.
        """
        from modalitybank.data.brats import SiteDataset, discover_site

        slices = config.preset(self.scale)["slices"]
        kw = dict(image_size=slices["image_size"], min_tumour_fraction=slices["min_tumour_fraction"],
                  max_slices_per_case=slices["max_slices_per_case"])
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
            return model[self.site], GanLoss(lambda_l1=self.settings.lambda_l1)
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
        try:
            if not self._ready:
                self._setup(fl_ctx)
            if task_name == wire.TASK_HELLO:
                data = {wire.MODALITIES: self.modalities, wire.NEXT_MASKS: self._next_masks(),
                        wire.SLICES: len(self.dataset)}
                return DXO(DataKind.APP_DEFINED, data).to_shareable()
            if task_name == wire.TASK_STEP:
                return self._step(shareable, fl_ctx, abort_signal)
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as err:  # the server logs the reason with the site's name
            self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} failed {task_name}: {err}")
            return self._error(f"{type(err).__name__}: {err}")

    @staticmethod
    def _error(reason: str) -> Shareable:
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply.set_header(wire.ERROR_HEADER, reason)
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
                                          batch.reals[m], wire.from_wire(sent), self.loss)
            out[wire.grad_key(m)] = wire.to_wire(grad, str(sent.dtype))
            losses |= {f"{m}/{k}": float(v) for k, v in site_losses.items()}
        self.before_reply(iteration, out, batch, abort_signal)
        out[wire.NEXT_MASKS] = self._next_masks()
        out[wire.LOSSES] = losses
        if iteration % self.settings.checkpoint_every == 0:
            atomic_save({m: {"d": self.model.discriminators[m].state_dict(), "opt": self.model.optimizers[m].state_dict()}
                         for m in self.modalities}, self.checkpoint)
        result = DXO(DataKind.APP_DEFINED, out).to_shareable()
        result.set_header(wire.ITERATION, iteration)
        return result

    def before_reply(self, iteration: int, out: dict[str, Any], batch: SiteBatch, abort_signal: Signal) -> None:
        """Called with a step's result (``out``, editable) before the next masks are added; nothing here.

        The tests' misbehaving sites (``tests/faulty_site.py``) override it to show the guards at work.
        """
