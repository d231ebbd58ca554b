"""FedML-All, the paper's federated-averaging baseline: the segmentation bundle
(``bundles/tumor_segmentation``) trained inside NVFlare, on the sites' *real* cases.

What runs where:

* **Server** — NVFlare's own FedAvg: ``ScatterAndGather`` + ``InTimeAccumulateWeightedAggregator``
  + ``FullModelShareableGenerator`` + ``PTFileModelPersistor`` (built by ``flare_app/job.py``
  :func:`fedavg_job`). The persistor's model is :class:`BundleNetwork`: the bundle's ``network_def``
  (``configs/train.json``) with ``modalities`` set to the experiment's ``targets``, its state-dict keys
  exactly the bundle network's. So the ``FL_global_model.pt`` it saves (``{"model": state_dict}``)
  is what the bundle's ``evaluate.json`` loads (``CheckpointLoader``, ``load_dict {"model": network}``).
  There is no model selector: **the job's result is the global model after the last round** (no
  model is ever chosen on test data); the benchmark evaluates it itself with ``evaluate.json``.
* **Each site** — :class:`FedAvgSegmentationExecutor`, an NVFlare ``Executor`` around MONAI's
  ``monai.fl.client.MonaiAlgo``, which runs the bundle's ``train`` workflow (its network,
  preprocessing, ``SupervisedTrainer``, loss and optimiser) on the site's own cases. The site's
  datalist comes from :func:`modalitybank.bundle.segmentation.brats_datalist`: with a ``data_root`` of
  its own (``local/modalitybank_site.json``) every case of that folder and the modalities its files
  hold; otherwise the job's ``data_root`` (or the phantom) restricted to the site's data centre
  (``configs/experiments.json``: ``site_centres``, and the experiment's ``sites`` → modalities). A
  modality the site lacks is listed under ``"missing"`` in every entry, and the bundle's
  ``FillMissingModalitiesd`` blanks that channel after normalisation, as for the benchmark's
  Real-X(n/a) rows. The datalist is written to ``datalist_<site>.json`` in the site's run folder.

Budget, in iterations: per round a site runs exactly ``local_iterations`` trainer iterations (the
bundle's ``epoch_length`` = ``local_iterations``; ``MonaiAlgo`` with ``local_epochs=1`` advances the
trainer's ``max_epochs`` by one per round), so over the job its network sees ``num_rounds ×
local_iterations`` iterations — set equal to the central rows' budget. The executor checks the count
and fails the task otherwise. The trainer, its data loader and its Adam optimiser live for the whole
run: every round starts from the global weights (copied *into* the same parameter tensors) and the
site's Adam moments carry over from its previous round (``MonaiAlgo`` does not reset them; NVFlare's
MONAI examples behave the same). The bundle's training-time ``ValidationHandler`` (which validates
and keeps a checkpoint on the test split) is removed: sites never see the test set.

Per round a site replies DXO ``WEIGHTS`` (full weights, numpy) with ``NUM_STEPS_CURRENT_ROUND`` =
iterations run (the aggregation weight: equal for all sites), and ``train_loss`` / ``train_dice``
(mean over the round's iterations / the bundle's ``train_mean_dice``) in its meta; it logs one line
``round r: site S (centre C) N iterations, mean loss L, train Dice D, T s`` and appends the same as
JSON to ``fedavg_metrics.jsonl`` in its run folder.

:func:`run_fedavg` is the one call the benchmark makes: export, simulate, return the final model.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from modalitybank import config
from modalitybank.bundle.seg_transforms import MISSING_KEY
from modalitybank.bundle.segmentation import brats_datalist
from modalitybank.fl.executor import site_data, site_seed
from modalitybank.fl.site_config import read_site_config
from modalitybank.resources import bundle_dir

__all__ = [
    "BUNDLE",
    "SITE_LOG",
    "BundleNetwork",
    "FedAvgSegmentationExecutor",
    "bundle_network",
    "experiment_modalities",
    "resolve_bundle",
    "run_fedavg",
]

#: The segmentation bundle every segmentation row of the benchmark trains.
BUNDLE = "tumor_segmentation"
#: One JSON line per round in each site's run folder.
SITE_LOG = "fedavg_metrics.jsonl"
#: Where the simulator's server keeps the global model (relative to the workspace).
SERVER_MODEL = Path("server") / "simulate_job" / "app_server" / "FL_global_model.pt"


def experiment_modalities(experiment: str) -> list[str]:
    """The network's input channels for ``experiment``: its ``targets`` (``configs/experiments.json``)."""
    return list(config.experiment(experiment)["targets"])


def resolve_bundle(bundle: str, app_root: str | Path | None = None) -> Path:
    """The bundle folder ``bundle``: an absolute path as it is; a name: the job's ``custom/<name>`` if the
    job carries it (``with_code``), else the bundle installed with the package."""
    path = Path(bundle)
    if path.is_absolute():
        return path
    if app_root is not None:
        carried = Path(app_root) / "custom" / path
        if (carried / "configs").is_dir():
            return carried
    return bundle_dir(bundle)


def bundle_network(modalities: Sequence[str], bundle: str | Path = BUNDLE) -> torch.nn.Module:
    """The bundle's ``network_def`` (``configs/train.json``) with one input channel per modality."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(resolve_bundle(str(bundle)) / "configs" / "train.json"))
    parser["modalities"] = list(modalities)
    return parser.get_parsed_content("network_def")


class BundleNetwork(torch.nn.Module):
    """The FedAvg global model: the segmentation bundle's ``network_def`` for the experiment's modalities.

    Its sub-modules are the bundle network's own, registered under the same names, so its state dict
    has exactly the bundle network's keys (it loads into ``network_def`` and into ``evaluate.json``).
    NVFlare's Job API writes it into the job as ``{"experiment": ..., "bundle": ...}``.
    """

    def __init__(self, experiment: str = "multimodal", bundle: str = BUNDLE) -> None:
        super().__init__()
        self.experiment, self.bundle = experiment, bundle  # read back by the Job API when it writes the config
        net = bundle_network(experiment_modalities(experiment), bundle)
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, param in net.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in net.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        object.__setattr__(self, "_network", net)  # shares every tensor; not a registered sub-module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._network(x)


class FedAvgSegmentationExecutor(Executor):
    """One hospital site of the FedML-All baseline: the bundle's ``train`` workflow under ``MonaiAlgo``
    (see the module docstring).

    Args:
        scale: the phantom used when neither the site nor the job names a data folder.
        experiment: ``multimodal`` or ``missing_modality``: the network's channels (the experiment's
            ``targets``) and which modalities each data centre holds.
        data_root: the BraTS-layout folder split by centre; empty: the phantom of ``scale``/``seed``.
            A ``data_root`` in the site's own ``local/modalitybank_site.json`` wins (all its cases).
        cache_dir: the slice cache of the phantom's other users (the bundle caches in memory).
        local_iterations: trainer iterations per round (the bundle's ``epoch_length``).
        learning_rate: the bundle's Adam learning rate.
        seed: ``monai.utils.set_determinism`` seed (offset per site: :func:`site_seed`).
        patch_size, num_samples, batch_size: bundle overrides (empty / 0: the bundle's).
        overrides: any further bundle config overrides (``{"id#path": value}``).
        bundle: the bundle (a name: carried in the job's ``custom/`` or installed; or an absolute path).
        threads: torch threads of this process.
        train_task_name: the task served.
    """

    _always_serialize_args = ("scale", "experiment", "data_root", "local_iterations", "learning_rate", "seed",
                              "bundle")

    def __init__(self, scale: str = "tiny", experiment: str = "multimodal", data_root: str = "",
                 cache_dir: str = "", local_iterations: int = 10, learning_rate: float = 1e-3, seed: int = 0,
                 patch_size: list[int] | None = None, num_samples: int = 0, batch_size: int = 0,
                 overrides: dict[str, Any] | None = None, bundle: str = BUNDLE, threads: int = 1,
                 train_task_name: str = AppConstants.TASK_TRAIN) -> None:
        super().__init__()
        if int(local_iterations) < 1:
            raise ValueError(f"local_iterations must be >= 1, got {local_iterations}")
        self.scale, self.experiment, self.data_root, self.cache_dir = scale, experiment, data_root, cache_dir
        self.local_iterations, self.learning_rate, self.seed = int(local_iterations), float(learning_rate), int(seed)
        self.patch_size, self.num_samples, self.batch_size = patch_size, int(num_samples), int(batch_size)
        self.overrides, self.bundle, self.threads = overrides, bundle, threads
        self.train_task_name = train_task_name
        self.channels = experiment_modalities(experiment)
        self._algo: Any = None
        self._setup_error: str | None = None
        self._abort: Signal | None = None
        self._losses: list[float] = []

    # -- set-up -----------------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except Exception as err:  # reported as the train task's failure; the detail stays in the site's log
                self._setup_error = f"{type(err).__name__}: {err}"
                self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()} could not start: {self._setup_error}")
        elif event_type == EventType.END_RUN and self._algo is not None:
            self._algo.finalize()

    def _datalist(self, own: dict[str, Any], out_json: Path) -> tuple[dict[str, Any], Path, str]:
        """The site's training datalist (written to ``out_json``), its data folder and a phrase saying
        where the cases come from."""
        if own.get("data_root"):
            from modalitybank.data.brats import discover_site

            root, _ = site_data(own["data_root"], own.get("cache_dir", self.cache_dir), self.scale, self.seed)
            held, _, _, grades = discover_site(root, own.get("file_names"))  # a case lacking one of them: error
            datalist = brats_datalist(root, self.channels, out_json, sections={"training": "all"}, grades=grades,
                                      present=held)
            return datalist, root, f"its own folder {root}"
        centre = config.centre_of_site(self.site)
        root, _ = site_data(self.data_root, own.get("cache_dir", self.cache_dir), self.scale, self.seed)
        held = config.experiment(self.experiment)["sites"][centre]
        datalist = brats_datalist(root, self.channels, out_json, sections={"training": "train"}, centres=[centre],
                                  present=held)
        return datalist, root, f"centre {centre} of {root}"

    def bundle_overrides(self, datalist: Path, dataset_dir: Path, output_dir: Path, bundle: Path) -> dict[str, Any]:
        """The overrides of the bundle's ``train.json`` on this site."""
        seed = site_seed(self.site, self.seed)
        out: dict[str, Any] = {
            "bundle_root": str(bundle),
            # load_datalist only: the bundle package's __init__ is not carried with the job's code
            "modalitybank_bundle": "$__import__('modalitybank.bundle.segmentation', fromlist=['load_datalist'])",
            "modalities": list(self.channels),
            "dataset_dir": str(dataset_dir),
            "datalist": str(datalist),
            "output_dir": str(output_dir),
            "epoch_length": self.local_iterations,
            "learning_rate": self.learning_rate,
            "num_workers": 0,
            # no ValidationHandler (it validates on the test split) and no TensorBoard files in the bundle
            "train#handlers": [],
            "initialize": [f"$monai.utils.set_determinism(seed={seed})"],
        }
        if self.patch_size:
            out["patch_size"] = list(self.patch_size)
        if self.num_samples:
            out["num_samples"] = self.num_samples
        if self.batch_size:
            out["train#dataloader#batch_size"] = self.batch_size
        out.update(self.overrides or {})
        return out

    def _setup(self, fl_ctx: FLContext) -> None:
        from ignite.engine import Events
        from monai.engines import SupervisedTrainer
        from monai.fl.client import MonaiAlgo
        from monai.fl.utils.constants import ExtraItems
        from monai.handlers import from_engine

        torch.set_num_threads(self.threads)
        self.site = fl_ctx.get_identity_name()
        workspace = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        own = read_site_config(self.site, workspace / "local")  # the site's own settings win over the job's
        self.run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        datalist_file = self.run_dir / f"datalist_{self.site}.json"
        datalist, root, where = self._datalist(own, datalist_file)
        self.centre = config.centre_of_site(self.site) if not own.get("data_root") else "own"
        if not datalist["training"]:
            raise FileNotFoundError(f"site {self.site}: no training case in {where}")
        bundle = resolve_bundle(self.bundle, fl_ctx.get_prop(FLContextKey.APP_ROOT))
        overrides = self.bundle_overrides(datalist_file, root, self.run_dir / "bundle", bundle)
        self._algo = MonaiAlgo(bundle_root=str(bundle), local_epochs=1, send_weight_diff=False,
                               config_train_filename="configs/train.json", train_kwargs=overrides,
                               config_evaluate_filename=None)
        self._algo.initialize(extra={ExtraItems.CLIENT_NAME: self.site, ExtraItems.APP_ROOT: ""})
        trainer: SupervisedTrainer = self._algo.trainer
        loss_of = from_engine(["loss"], first=True)

        def record(engine: SupervisedTrainer) -> None:
            self._losses.append(float(loss_of(engine.state.output)))
            if self._abort is not None and self._abort.triggered:
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
        missing = datalist.get("missing_modalities", [])
        self.log_info(fl_ctx, f"site {self.site} = {where}: {len(datalist['training'])} training cases, channels "
                      f"{self.channels}" + (f" ({missing} blanked: '{MISSING_KEY}' in {datalist_file.name})"
                                            if missing else "")
                      + f"; bundle {bundle}, {self.local_iterations} iterations per round")

    # -- tasks ------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != self.train_task_name:
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._algo is None:
            self.log_error(fl_ctx, f"site {fl_ctx.get_identity_name()} is not set up: {self._setup_error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            return self._train(shareable, fl_ctx, abort_signal)
        except Exception as err:
            self.log_exception(fl_ctx, f"site {self.site} failed {task_name}: {type(err).__name__}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        from monai.fl.utils.constants import FlStatistics
        from monai.fl.utils.exchange_object import ExchangeObject

        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected DXO of kind WEIGHTS, got {dxo.data_kind}")
        started = time.perf_counter()
        self._losses, self._abort = [], abort_signal
        self._algo.train(ExchangeObject(weights={k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()}))
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        result = self._algo.get_weights()
        iterations = int(result.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS])
        if iterations != self.local_iterations:
            raise RuntimeError(f"the trainer ran {iterations} iterations, not {self.local_iterations}")
        loss = float(np.mean(self._losses)) if self._losses else math.nan
        dice = self._algo.trainer.state.metrics.get("train_mean_dice")
        line = {"round": current_round, "site": self.site, "centre": self.centre, "iterations": iterations,
                "total_iterations": int(self._algo.trainer.state.iteration), "train_loss": loss,
                "train_dice": None if dice is None else float(dice),
                "seconds": round(time.perf_counter() - started, 3)}
        with open(self.run_dir / SITE_LOG, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        self.log_info(fl_ctx, f"round {current_round}: site {self.site} ({self.centre}) {iterations} iterations, "
                      f"mean loss {loss:.4f}, train Dice {line['train_dice']}, {line['seconds']:.1f} s")
        weights = {k: v.detach().cpu().numpy() for k, v in result.weights.items()}
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: iterations, "train_loss": loss, "train_dice": line["train_dice"]}
        return DXO(DataKind.WEIGHTS, weights, meta=meta).to_shareable()


def run_fedavg(workdir: str | Path, experiment: str = "multimodal", data_root: str | Path | None = None,
               scale: str = "tiny", num_rounds: int = 5, local_iterations: int = 10, seed: int = 0,
               n_clients: int = 3, with_code: bool = False, progress: bool = False,
               **bundle_overrides: Any) -> dict[str, Any]:
    """FedML-All end to end: the FedAvg job exported into ``workdir`` and run in the NVFlare simulator,
    one process per site (:func:`modalitybank.fl.jobs.simulate`).

    ``bundle_overrides`` are arguments of :class:`FedAvgSegmentationExecutor` (``learning_rate``,
    ``patch_size``, ``num_samples``, ``batch_size``, ``overrides``, ``cache_dir``). Each site runs
    ``local_iterations`` iterations per round, ``num_rounds × local_iterations`` in all.

    Returns ``{"model": FL_global_model.pt (the global model after the last round), "bundle_model":
    ``workdir/models/model.pt`` (the same weights in the segmentation bundle's layout, for its ``evaluate.json``
    and MONAI Label), "sites": [...], "rounds": n, "iterations": {site: total}, "seconds": s, "workspace": ...,
    "log": ...}``. Raises
    ``RuntimeError`` if the simulator fails or a site did not train every round.
    """
    jobs = importlib.import_module("modalitybank.fl.jobs")  # not traced into a job's custom/ code
    name = {"multimodal": "fedavg_segmentation"}.get(experiment, f"fedavg_segmentation_{experiment}")
    if name not in jobs.app().JOBS:
        raise ValueError(f"no FedAvg job for experiment {experiment!r}")
    args = {k: v for k, v in bundle_overrides.items() if v is not None}
    out = jobs.simulate(name, workdir, scale=scale, rounds=num_rounds, n_clients=n_clients, progress=progress,
                        with_code=with_code, local_iterations=local_iterations, seed=seed,
                        data_root=str(data_root) if data_root else None, **args)
    workspace = Path(out["workspace"])
    model = workspace / SERVER_MODEL
    sites = [f"site-{i + 1}" for i in range(n_clients)]
    totals: dict[str, int] = {}
    for site in sites:
        log = next((workspace / site).rglob(SITE_LOG), None)
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log else []
        if [x["round"] for x in lines] != list(range(num_rounds)) or any(
                x["iterations"] != local_iterations for x in lines):
            raise RuntimeError(f"site {site} did not train {num_rounds} rounds of {local_iterations} iterations "
                               f"({[(x['round'], x['iterations']) for x in lines]}); see {out['log']}")
        totals[site] = sum(x["iterations"] for x in lines)
    if not model.is_file():
        raise RuntimeError(f"no global model {model}; see {out['log']}")
    bundle_model = Path(workdir) / "models" / "model.pt"  # NVFlare's {"model": state, "train_conf": ..} -> state
    bundle_model.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.load(model, map_location="cpu", weights_only=True)["model"], bundle_model)
    return {"model": str(model), "bundle_model": str(bundle_model), "sites": sites, "rounds": num_rounds, "iterations": totals,
            "seconds": out["seconds"], "workspace": str(workspace), "log": out["log"]}
