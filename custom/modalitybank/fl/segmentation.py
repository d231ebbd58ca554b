"""FedML-All, the paper's federated-averaging baseline: the 2D segmentation network trained by
NVFlare's own FedAvg (``ScatterAndGather`` + ``InTimeAccumulateWeightedAggregator`` +
``PTFileModelPersistor``) on the sites' *real* slices.

Client side, :class:`FedAvgSegmentationExecutor` handles

* ``train``: DXO ``WEIGHTS`` in (the global model, numpy arrays); validates it on the held-out test
  split (``dice_global``), runs the local Adam steps on the site's slices (MONAI ``DiceCELoss`` on
  the whole tumour, label > 0), validates the result (``dice_local``) and returns DXO ``WEIGHTS``
  with ``NUM_STEPS_CURRENT_ROUND`` (the aggregation weight), ``INITIAL_METRICS = {"val_dice":
  dice_global}`` (what NVFlare's ``IntimeModelSelector`` reads to keep the best global model) and
  ``val_dice_local`` / ``train_loss`` in its meta. One line per round goes to the site's log and to
  ``fedavg_metrics.jsonl`` in the site's run directory.
* ``validate`` (NVFlare's ``GlobalModelEval`` / ``CrossSiteModelEval``): DXO ``WEIGHTS`` in, DXO
  ``METRICS`` ``{"val_dice": d}`` out.
* ``submit_model``: the site's last locally trained weights (for ``CrossSiteModelEval``).

Missing modalities: FedAvg averages one network, so every site must feed it the same input
channels — all modalities of the experiment, in :data:`modalitybank.config.MODALITIES` order. A
site that lacks a modality (the ``missing_modality`` experiment) feeds a channel of zeros in its
place. That is exactly what the paper means by FedML not adapting to missing modalities: the
network sees an all-zero channel at that site in training and the real modality at test time.

Server side, :class:`FedSegmentationNet` is the global model the persistor initialises and saves
(a MONAI ``BasicUNet`` with the same layout and state-dict keys as
:func:`modalitybank.networks.segmentation_network`), and :class:`RoundDiceLogger` writes one line
per round with every site's Dice to ``fedavg_rounds.jsonl`` in the server's run directory (and
one ``"round": "final"`` line per evaluated server model from the ``validate`` task).

Dice is MONAI's ``DiceMetric`` on the tumour channel, averaged over the test slices (every test
slice holds tumour; a slice without tumour counts 1 if the prediction is empty too).
"""

from __future__ import annotations

import inspect
import json
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from modalitybank import config
from modalitybank.networks import segmentation_network

__all__ = [
    "DEFAULT_LOCAL_STEPS",
    "METRIC",
    "FedAvgSegmentationExecutor",
    "FedSegmentationNet",
    "RoundDiceLogger",
    "dice_score",
    "experiment_modalities",
    "site_inputs",
    "whole_tumour",
]

#: Local Adam steps per round when the job sets neither ``local_steps`` nor ``local_epochs``.
DEFAULT_LOCAL_STEPS: dict[str, int] = {"tiny": 10, "small": 50, "paper": 200}
#: The key metric's name in DXO meta and in validation results.
METRIC = "val_dice"
SITE_LOG = "fedavg_metrics.jsonl"
SERVER_LOG = "fedavg_rounds.jsonl"
_FEATURES = tuple(inspect.signature(segmentation_network).parameters["features"].default)


def experiment_modalities(experiment: str) -> list[str]:
    """The input channels of the federated network: every modality any site of ``experiment``
    holds, in :data:`modalitybank.config.MODALITIES` order."""
    held = {m for mods in config.experiment(experiment)["sites"].values() for m in mods}
    return [m for m in config.MODALITIES if m in held]


def site_inputs(images: torch.Tensor, have: Sequence[str], channels: Sequence[str]) -> torch.Tensor:
    """``(N, len(have), H, W)`` images of the modalities ``have`` → ``(N, len(channels), H, W)``
    in the order of ``channels``, a modality the site lacks left as a channel of zeros."""
    out = images.new_zeros((images.shape[0], len(channels), *images.shape[2:]))
    for i, m in enumerate(have):
        out[:, list(channels).index(m)] = images[:, i]
    return out


def whole_tumour(label: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` BraTS labels → ``(N, 1, H, W)`` float whole-tumour mask (label > 0)."""
    return (label > 0).unsqueeze(1).float()


class FedSegmentationNet(BasicUNet):
    """The global model of the FedAvg job: :func:`~modalitybank.networks.segmentation_network` with
    one input channel per modality of ``experiment`` and two outputs (background, tumour). Its state
    dict loads into ``segmentation_network(in_channels=len(experiment_modalities(experiment)))``."""

    def __init__(self, experiment: str = "multimodal", out_channels: int = 2) -> None:
        super().__init__(spatial_dims=2, in_channels=len(experiment_modalities(experiment)),
                         out_channels=out_channels, features=_FEATURES)
        self.experiment = experiment  # read back by NVFlare's Job API when it writes the job config


@torch.no_grad()
def dice_score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    """Mean whole-tumour Dice of ``model`` over slices ``images (N, C, H, W)``, ``labels (N, H, W)``."""
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    was_training = model.training
    model.eval()
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        pred = torch.nn.functional.one_hot(logits.argmax(1), 2).permute(0, 3, 1, 2).float()
        truth = torch.nn.functional.one_hot((labels[i : i + batch_size] > 0).long(), 2).permute(0, 3, 1, 2).float()
        metric(y_pred=pred, y=truth)
    model.train(was_training)
    return float(metric.aggregate().item())


def _numpy_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load_weights(model: torch.nn.Module, weights: Mapping[str, Any]) -> None:
    state = model.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise KeyError(f"the global model lacks {len(missing)} parameter(s) of the local network, e.g. {missing[:3]}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(weights[k])).reshape(state[k].shape).to(state[k].dtype)
                           for k in state})


class FedAvgSegmentationExecutor(Executor):
    """One hospital site of the FedML-All baseline (see the module docstring).

    Args:
        scale: size preset: slice size and slices per case (``configs/presets.json``) and the
            default number of local steps (:data:`DEFAULT_LOCAL_STEPS`).
        experiment: ``multimodal`` or ``missing_modality``: which modalities each centre holds.
        data_root: the BraTS-layout folder; empty: the embedded phantom of ``scale``/``seed``.
        cache_dir: slice cache; empty: the shared cache next to the phantom.
        local_steps: Adam steps per round (0: the scale's default). Ignored if ``local_epochs``.
        local_epochs: passes over the site's slices per round (0: use ``local_steps``); with it a
            site's aggregation weight is proportional to its data, as in McMahan et al.'s FedAvg.
        batch_size: slices per step (0: the preset's ``train.batch_size``).
        lr: Adam learning rate.
        seed: batch order.
        threads: torch threads of this process.
        train_task_name, validate_task_name, submit_model_task_name: task names served.
    """

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", data_root: str = "",
                 cache_dir: str = "", local_steps: int = 0, local_epochs: int = 0, batch_size: int = 0,
                 lr: float = 1e-3, seed: int = 0, threads: int = 1,
                 train_task_name: str = AppConstants.TASK_TRAIN,
                 validate_task_name: str = AppConstants.TASK_VALIDATION,
                 submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL) -> None:
        super().__init__()
        config.preset(scale)  # fail early on an unknown scale
        self.channels = experiment_modalities(experiment)
        self.scale, self.experiment, self.data_root, self.cache_dir = scale, experiment, data_root, cache_dir
        self.local_steps, self.local_epochs, self.batch_size = int(local_steps), int(local_epochs), int(batch_size)
        self._steps = self.local_steps or DEFAULT_LOCAL_STEPS.get(scale, 10)
        self._batch = self.batch_size or config.preset(scale)["train"]["batch_size"]
        self.lr, self.seed, self.threads = lr, seed, threads
        self.train_task_name, self.validate_task_name = train_task_name, validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self._ready = False

    # -- set-up -----------------------------------------------------------------------------
    def _setup(self, fl_ctx: FLContext) -> None:
        from modalitybank.data.brats import SiteDataset
        from modalitybank.fl.executor import site_data

        torch.set_num_threads(self.threads)
        self.site = fl_ctx.get_identity_name()
        self.centre = config.centre_of_site(self.site)
        self.modalities = list(config.experiment(self.experiment)["sites"][self.centre])
        root, cache = site_data(self.data_root, self.cache_dir, self.scale, self.seed)
        slices = config.preset(self.scale)["slices"]
        kw = dict(cache_dir=cache, image_size=slices["image_size"],
                  min_tumour_fraction=slices["min_tumour_fraction"], max_slices_per_case=slices["max_slices_per_case"])
        train = SiteDataset(root, self.centre, self.modalities, split="train", **kw)
        test = SiteDataset(root, None, self.channels, split="test", **kw)
        self.train_images = site_inputs(train.images, self.modalities, self.channels)
        self.train_labels = whole_tumour(train.labels)
        self.test_images, self.test_labels = test.images, test.labels
        self.model = segmentation_network(in_channels=len(self.channels), out_channels=2)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.batches = self._batches(zlib.crc32(self.site.encode()) + self.seed)
        self.local_weights: dict[str, np.ndarray] | None = None
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        self.metrics_file = run_dir / SITE_LOG
        zeros = [m for m in self.channels if m not in self.modalities]
        self.log_info(fl_ctx, f"site {self.site} = centre {self.centre}: {len(train)} training slices of "
                      f"{len(train.case_ids)} cases, modalities {self.modalities}"
                      + (f" (zeros for {zeros})" if zeros else "")
                      + f"; test split {len(test)} slices of {len(test.case_ids)} cases")
        self._ready = True

    def _batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        n = self.train_images.shape[0]
        size = min(self._batch, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - size + 1, size):
                idx = order[i : i + size]
                yield self.train_images[idx], self.train_labels[idx]

    def _steps_this_round(self) -> int:
        if self.local_epochs:
            return self.local_epochs * max(1, self.train_images.shape[0] // min(self._batch, self.train_images.shape[0]))
        return self._steps

    # -- tasks ------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if not self._ready:
                self._setup(fl_ctx)
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx)
            if task_name == self.submit_model_task_name:
                if self.local_weights is None:
                    return make_reply(ReturnCode.EMPTY_RESULT)
                return DXO(DataKind.WEIGHTS, self.local_weights).to_shareable()
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as err:
            self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} failed {task_name}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _receive_weights(self, shareable: Shareable) -> None:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected DXO of kind WEIGHTS, got {dxo.data_kind}")
        _load_weights(self.model, dxo.data)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        num_rounds = shareable.get_header(AppConstants.NUM_ROUNDS)
        self._receive_weights(shareable)
        started = time.perf_counter()
        dice_global = dice_score(self.model, self.test_images, self.test_labels)
        self.model.train()
        steps, losses = self._steps_this_round(), []
        for _ in range(steps):
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            x, y = next(self.batches)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss))
        dice_local = dice_score(self.model, self.test_images, self.test_labels)
        loss = float(np.mean(losses)) if losses else math.nan
        line = {"round": current_round, "num_rounds": num_rounds, "site": self.site, "centre": self.centre,
                "steps": steps, "train_loss": loss, "dice_global": dice_global, "dice_local": dice_local,
                "seconds": round(time.perf_counter() - started, 3)}
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        self.log_info(fl_ctx, f"round {current_round}: site {self.site} ({self.centre}) {steps} steps, "
                      f"loss {loss:.4f}, test Dice global {dice_global:.4f} -> local {dice_local:.4f}")
        self.local_weights = _numpy_weights(self.model)
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps, MetaKey.INITIAL_METRICS: {METRIC: dice_global},
                f"{METRIC}_local": dice_local, "train_loss": loss, "centre": self.centre}
        return DXO(DataKind.WEIGHTS, self.local_weights, meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        owner = shareable.get_header(AppConstants.MODEL_OWNER) or "?"
        self._receive_weights(shareable)
        dice = dice_score(self.model, self.test_images, self.test_labels)
        self.log_info(fl_ctx, f"validate: model of {owner} on the test split at {self.site}: Dice {dice:.4f}")
        return DXO(DataKind.METRICS, {METRIC: dice}).to_shareable()


class RoundDiceLogger(FLComponent):
    """Server widget: one JSON line per FedAvg round with each site's Dice (``fedavg_rounds.jsonl``
    in the run directory, and the server log), plus one ``"round": "final"`` line per server model
    evaluated by a ``validate`` workflow (``GlobalModelEval``).

    A round's line: ``round``; ``sites`` → ``{site: {centre, steps, train_loss, dice_global,
    dice_local}}``; ``dice_global`` (the mean over sites of the Dice of the global model the round
    started from) and ``dice_local`` (the mean after local training).
    """

    def __init__(self, file_name: str = SERVER_LOG) -> None:
        super().__init__()
        self.file_name = file_name
        self._round: dict[str, dict[str, Any]] = {}
        self._final: dict[str, dict[str, float]] = {}

    def _write(self, fl_ctx: FLContext, line: dict[str, Any]) -> None:
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with open(run_dir / self.file_name, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_STARTED:
            self._round = {}
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            peer = fl_ctx.get_peer_context()
            try:
                dxo = from_shareable(peer.get_prop(FLContextKey.SHAREABLE))
            except Exception:
                return
            initial = dxo.get_meta_prop(MetaKey.INITIAL_METRICS) or {}
            self._round[peer.get_identity_name(default="?")] = {
                "centre": dxo.get_meta_prop("centre"), "steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                "train_loss": dxo.get_meta_prop("train_loss"), "dice_global": initial.get(METRIC),
                "dice_local": dxo.get_meta_prop(f"{METRIC}_local")}
        elif event_type == AppEventType.ROUND_DONE:
            current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            line = {"round": current_round, "sites": dict(sorted(self._round.items()))}
            for key in ("dice_global", "dice_local"):
                values = [s[key] for s in self._round.values() if isinstance(s[key], (int, float))]
                line[key] = float(np.mean(values)) if values else None
            self._write(fl_ctx, line)
            self.log_info(fl_ctx, f"round {current_round}: mean test Dice global {line['dice_global']} -> local "
                          f"{line['dice_local']} over {sorted(self._round)}")
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER, None)
            site = fl_ctx.get_prop(AppConstants.DATA_CLIENT, None)
            result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT, None)
            try:
                dxo = from_shareable(result)
                self._final.setdefault(str(owner), {})[str(site)] = float(dxo.data[METRIC])
            except Exception:
                self.log_warning(fl_ctx, f"no {METRIC} in the validation result of {owner} from {site}")
        elif event_type == EventType.END_RUN:
            for owner, sites in sorted(self._final.items()):
                line = {"round": "final", "model": owner, "sites": dict(sorted(sites.items())),
                        "dice": float(np.mean(list(sites.values())))}
                self._write(fl_ctx, line)
                self.log_info(fl_ctx, f"final: {owner} test Dice {line['dice']:.4f} ({line['sites']})")
