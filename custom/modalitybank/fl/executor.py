"""The site executor: runs inside a hospital, next to its data.

It loads the site's slices once, keeps one discriminator per modality the site holds resident
across iterations, and per task runs :func:`modalitybank.gan.site_step` on the fakes the server
sent. It returns only gradients w.r.t. those fakes, scalar losses and the masks of its next
batch; real images never leave (and the :mod:`~modalitybank.fl.privacy` guard checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from modalitybank import config
from modalitybank.bank import atomic_save
from modalitybank.fl import wire
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, site_step
from modalitybank.training import BatchStream, TrainSettings, make_site_models

__all__ = ["SiteExecutor"]

ERROR_HEADER = "modalitybank_error"


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
            empty: the package's defaults for the preset (the same figures).
        threads: torch threads of this process.
        faults: test hooks that make a site misbehave on purpose, by site name:
            ``{"site-2": {"leak_real": true}}``; kinds: ``leak_real``, ``nan_from: k``,
            ``huge_from: k``, ``hang_at: k`` with ``hang_seconds: s``.
    """

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", data_root: str = "",
                 cache_dir: str = "", seed: int = 0, checkpoint_every: int = 0, threads: int = 1,
                 discriminator_bundle: str = "",
                 faults: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.scale, self.experiment, self.seed = scale, experiment, seed
        self.data_root, self.cache_dir = data_root, cache_dir
        self.checkpoint_every = checkpoint_every or config.preset(scale)["train"]["checkpoint_every"]
        self.threads, self.discriminator_bundle = threads, discriminator_bundle
        self.faults = faults or {}
        self._ready = False

    # -- set-up -----------------------------------------------------------------------------
    def _setup(self, fl_ctx: FLContext) -> None:
        from modalitybank.data.brats import SiteDataset
        from modalitybank.data.default import CACHE_ROOT, default_phantom

        torch.set_num_threads(self.threads)
        self.site = fl_ctx.get_identity_name()
        centre = config.centre_of_site(self.site)
        exp = config.experiment(self.experiment)
        self.modalities = list(exp["sites"][centre])
        root = Path(self.data_root) if self.data_root else default_phantom(self.scale, self.seed)
        slices = config.preset(self.scale)["slices"]
        self.dataset = SiteDataset(root, centre, self.modalities, split="train",
                                   cache_dir=self.cache_dir or CACHE_ROOT / "slices",
                                   image_size=slices["image_size"], min_tumour_fraction=slices["min_tumour_fraction"],
                                   max_slices_per_case=slices["max_slices_per_case"])
        self.settings = TrainSettings.from_preset(self.scale, "bank", seed=self.seed)
        self.model, self.loss = self._discriminators(fl_ctx)
        workspace = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        self.checkpoint = workspace / "modalitybank" / f"{self.experiment}-{self.scale}" / "discriminators.pt"
        if self.checkpoint.is_file():
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            for m in self.modalities:
                self.model.discriminators[m].load_state_dict(state[m]["d"])
                self.model.optimizers[m].load_state_dict(state[m]["opt"])
            self.log_info(fl_ctx, f"resumed discriminators from {self.checkpoint}")
        self.stream = BatchStream(self.dataset, self.settings.batch_size, self.seed + hash(self.site) % 1000)
        self.pending: SiteBatch | None = None
        self.log_info(fl_ctx, f"site {self.site} = centre {centre}: {len(self.dataset)} slices of "
                      f"{len(self.dataset.case_ids)} cases, modalities {self.modalities}")
        self._ready = True

    def _discriminators(self, fl_ctx: FLContext) -> tuple[SiteModel, GanLoss]:
        """One discriminator and optimiser per modality, from the site-discriminator bundle if given."""
        if not self.discriminator_bundle:
            model = make_site_models({self.site: self.modalities}, config.preset(self.scale)["model"], self.settings)
            return model[self.site], GanLoss(lambda_l1=self.settings.lambda_l1)
        from modalitybank.bundle import site_discriminator_from_bundle

        bundle = Path(self.discriminator_bundle)
        if not bundle.is_absolute():
            bundle = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / "custom" / bundle
        built = {m: site_discriminator_from_bundle(bundle, {"scale": self.scale}) for m in self.modalities}
        self.log_info(fl_ctx, f"discriminators built from the bundle {bundle}")
        model = SiteModel({m: b[0] for m, b in built.items()}, {m: b[1] for m, b in built.items()})
        return model, built[self.modalities[0]][2]

    def _next_masks(self) -> np.ndarray:
        self.pending = next(self.stream)
        return wire.encode_masks(self.pending.label, self.pending.brain)

    # -- tasks ------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
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
            reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
            reply.set_header(ERROR_HEADER, f"{type(err).__name__}: {err}")
            return reply

    def _step(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        iteration = int(shareable.get_header(wire.ITERATION) or 0)
        data = from_shareable(shareable).data
        if self.pending is None:
            raise RuntimeError("fakes arrived before this site sent any masks")
        batch, out, losses = self.pending, {}, {}
        for m in self.modalities:
            sent = data[wire.fake_key(m)]
            if sent.shape[0] != batch.mask.shape[0]:
                raise ValueError(f"fakes for {m} have batch {sent.shape[0]}, the masks sent had {batch.mask.shape[0]}")
            grad, site_losses = site_step(self.model.discriminators[m], self.model.optimizers[m], batch.mask,
                                          batch.reals[m], wire.from_wire(sent), self.loss)
            out[wire.grad_key(m)] = wire.to_wire(grad, str(sent.dtype))
            losses |= {f"{m}/{k}": float(v) for k, v in site_losses.items()}
        self._apply_faults(iteration, out, batch, abort_signal)
        out[wire.NEXT_MASKS] = self._next_masks()
        out[wire.LOSSES] = losses
        if iteration % self.checkpoint_every == 0:
            atomic_save({m: {"d": self.model.discriminators[m].state_dict(), "opt": self.model.optimizers[m].state_dict()}
                         for m in self.modalities}, self.checkpoint)
        result = DXO(DataKind.APP_DEFINED, out).to_shareable()
        result.set_header(wire.ITERATION, iteration)
        return result

    def _apply_faults(self, iteration: int, out: dict[str, Any], batch: SiteBatch, abort_signal: Signal) -> None:
        """Test hooks (``faults``): misbehave on purpose so that the guards can be seen working."""
        f = self.faults.get(self.site, {})
        if f.get("leak_real"):
            m = self.modalities[0]
            out[f"real/{m}"] = wire.to_wire(batch.reals[m], "float32")
        if "nan_from" in f and iteration >= f["nan_from"]:
            for k in out:
                out[k] = np.full_like(out[k], np.nan)
        if "huge_from" in f and iteration >= f["huge_from"]:
            for k in out:
                out[k] = (out[k] * 1e6).astype(out[k].dtype)
        if f.get("hang_at") == iteration:
            import time

            end = time.time() + float(f.get("hang_seconds", 10))
            while time.time() < end and not abort_signal.triggered:
                time.sleep(0.1)
