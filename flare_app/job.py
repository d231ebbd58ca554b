"""The ModalityBank NVFlare app: every job folder in ``jobs/`` is made here, with NVFlare's Job API.

Server: :class:`~modalitybank.fl.controller.ModalityBankController` (the generator and its bank).
Each site: :class:`~modalitybank.fl.executor.SiteExecutor` for the hello and GAN-step tasks, the
task-data filter :class:`~modalitybank.fl.privacy.TaskManifestRecorder` (what the server sent) and
the task-result filter :class:`~modalitybank.fl.privacy.PrivacyGuard` (what may leave), and the
``site_discriminator`` MONAI bundle the site builds its discriminators from. The FedAvg jobs
(FedML-All) are NVFlare's own ``ScatterAndGather`` over the ``tumor_segmentation`` bundle's network,
each site training the bundle under MONAI's ``MonaiAlgo``
(:class:`~modalitybank.fl.segmentation.FedAvgSegmentationExecutor`).

Two ways for the sites to get the code:

* **package** (the default, production): every site has the ``modalitybank`` package installed;
  the job carries configuration only (no ``custom/`` folder, so no BYOC right is needed), and each
  site's ``class_allow_list`` admits ``modalitybank.`` classes. This is what ``jobs/`` holds.
* **code** (``with_code=True``): the job carries the runtime modules of the package (those the app's
  classes import, found by the Job API) and the site-discriminator bundle in ``custom/``, for sites
  that do not have the package (they need BYOC allowed, and a ``data_root``: the phantom generator
  is not carried).

Run it as NVFlare's examples do::

    python flare_app/job.py --export jobs                      # the committed job folders
    python flare_app/job.py --export /tmp/jobs --with-code     # the same, carrying the code
    python flare_app/job.py --job modalitybank_multimodal --simulate /tmp/ws --rounds 3

``modalitybank fl export-jobs`` and ``modalitybank fl simulate`` call :func:`make_job` from an
installed package too.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import (
    InTimeAccumulateWeightedAggregator,
)
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from modalitybank.fl import wire
from modalitybank.fl.controller import ModalityBankController
from modalitybank.fl.executor import SiteExecutor
from modalitybank.fl.privacy import PrivacyGuard, TaskManifestRecorder
from modalitybank.fl.segmentation import BUNDLE as SEGMENTATION_BUNDLE
from modalitybank.fl.segmentation import BundleNetwork, FedAvgSegmentationExecutor
from modalitybank.resources import bundle_dir

#: The jobs of ``jobs/``: the paper's experiments and baselines.
JOBS: dict[str, dict[str, Any]] = {
    "modalitybank_multimodal": {"kind": "gan", "experiment": "multimodal"},
    "modalitybank_missing_modality": {"kind": "gan", "experiment": "missing_modality"},
    "asyndgan": {"kind": "gan", "experiment": "multimodal", "baseline": "asyndgan"},
    "fedavg_segmentation": {"kind": "fedavg", "experiment": "multimodal"},
    "fedavg_segmentation_missing_modality": {"kind": "fedavg", "experiment": "missing_modality"},
}
#: How often a site asks the server for work when there is none (seconds; the server's
#: ``task_request_interval``, which it tells every site, and the sites' first fetch interval). At
#: NVFlare's defaults (2 s, 0.5 s) latency, not compute, sets the pace; much shorter, the sites' requests
#: take the CPU from the server's generator pass: in POC at tiny, 0.02 s gave 3.8-4.6 s per iteration and
#: 0.1 s 2.1-2.2 s (0.2 s: 2.1, 0.5 s: 2.2; README, Results). Each request of an idle site costs the server a
#: message round trip.
POLL_INTERVAL = 0.1
#: Arrays and tensors travel inside the task and result messages (NVFlare's decomposers with a download
#: chunk size of 0), not as references the receiver downloads from the sender in a second exchange. Ours are
#: small (gradients, fakes, masks: a few MB per message at most; the FedAvg job's weights alike), and that
#: second exchange failed in CI once, at random ("no ref found for <ref> from server.simulate_job" in
#: nvflare 2.9's DownloadService, after which the server ends the job).
INLINE_ARRAYS = {"np_download_chunk_size": 0, "tensor_download_chunk_size": 0}
#: The site-discriminator bundle, carried as ``custom/<name>`` with ``with_code``.
DISCRIMINATOR_BUNDLE = "site_discriminator"
#: Package markers carried with the code (``bundle/__init__`` is left out: it imports every bundle's helpers).
PACKAGE_INITS = ("__init__.py", "fl/__init__.py", "data/__init__.py")
#: Rounds, local iterations per round and site, and the sites a FedAvg round waits for (it aggregates
#: once that many answered): each site's network sees ``num_rounds × local_iterations`` iterations.
FEDAVG = {"num_rounds": 5, "local_iterations": 10, "min_clients": 3}


def _params(cls: type) -> set[str]:
    """The constructor arguments of ``cls`` and of the classes it passes ``**kwargs`` on to."""
    return {p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}


def _args_for(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``args`` that are arguments of ``cls``."""
    names = _params(cls)
    return {k: v for k, v in args.items() if k in names and v is not None}


def _unknown(args: dict[str, Any], *classes: type) -> list[str]:
    known = set().union(*(_params(cls) for cls in classes))
    return sorted(k for k, v in args.items() if k not in known and v is not None)


def system_params(interval: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's and the clients' system parameters: how often an idle site asks for work
    (``interval``, see :data:`POLL_INTERVAL`) and :data:`INLINE_ARRAYS`."""
    if not interval > 0:
        raise ValueError(f"poll_interval must be > 0 seconds, not {interval!r}")
    return ({"server": {"task_request_interval": interval}, **INLINE_ARRAYS},
            {"default_task_fetch_interval": interval, **INLINE_ARRAYS})


def gan_job(name: str, experiment: str, baseline: str = "", site_executor: type[SiteExecutor] = SiteExecutor,
            with_code: bool = False, poll_interval: float = POLL_INTERVAL, **args: Any) -> FedJob:
    """A ModalityBank (or AsynDGAN) job: the controller on the server, the site executor and filters on each site.

    ``args`` are arguments of the controller and of the site executor (``scale`` goes to both;
    ``iterations``, ``pretrained``, ``wire_dtype``, ... to the server; ``data_root``, ``cache_dir`` to
    the sites). ``poll_interval``: see :data:`POLL_INTERVAL`.
    """
    bad = _unknown(args, ModalityBankController, site_executor)
    if bad:
        raise ValueError(f"job {name}: unknown arguments {bad}")
    job = FedJob(name=name, min_clients=1)
    job.to_server(ModalityBankController(**_args_for(ModalityBankController, {
        "experiment": experiment, "baseline": baseline, **args})), id="modalitybank")
    server_params, client_params = system_params(poll_interval)
    job.to_server(server_params)
    executor = site_executor(**_args_for(site_executor, {
        "experiment": experiment, "discriminator_bundle": DISCRIMINATOR_BUNDLE, **args}))
    job.to_clients(executor, tasks=list(wire.TASKS))
    job.to_clients(TaskManifestRecorder(), filter_type=FilterType.TASK_DATA, tasks=list(wire.TASKS))
    job.to_clients(PrivacyGuard(), filter_type=FilterType.TASK_RESULT, tasks=list(wire.TASKS))
    job.to_clients(client_params)
    _code(job, with_code, bundles={DISCRIMINATOR_BUNDLE: ""})
    return job


def fedavg_job(name: str, experiment: str, with_code: bool = False, num_rounds: int = FEDAVG["num_rounds"],
               local_iterations: int = FEDAVG["local_iterations"], min_clients: int = FEDAVG["min_clients"],
               poll_interval: float = POLL_INTERVAL, **args: Any) -> FedJob:
    """FedML-All: NVFlare's FedAvg (``ScatterAndGather``) of the segmentation bundle's network, each site
    training the bundle's ``train`` workflow on its own real cases for ``local_iterations`` per round.

    No model selector: the job's result is ``FL_global_model.pt``, the global model after the last
    round. ``args`` are arguments of :class:`~modalitybank.fl.segmentation.FedAvgSegmentationExecutor`.
    """
    bad = _unknown(args, FedAvgSegmentationExecutor)
    if bad:
        raise ValueError(f"job {name}: unknown arguments {bad}")
    job = FedJob(name=name, min_clients=min_clients)
    persistor = job.to_server(PTFileModelPersistor(model=BundleNetwork(experiment=experiment)), id="persistor")
    aggregator = job.to_server(InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHTS"), id="aggregator")
    generator = job.to_server(FullModelShareableGenerator(), id="shareable_generator")
    job.to_server(ScatterAndGather(min_clients=min_clients, num_rounds=num_rounds, aggregator_id=aggregator,
                                   persistor_id=persistor, shareable_generator_id=generator,
                                   wait_time_after_min_received=0, train_timeout=0, task_check_period=0.05),
                  id="fedavg")
    server_params, client_params = system_params(poll_interval)
    job.to_server(server_params)
    job.to_clients(FedAvgSegmentationExecutor(**_args_for(FedAvgSegmentationExecutor, {
        "experiment": experiment, "local_iterations": local_iterations, **args})), tasks=["train"])
    job.to_clients(client_params)
    _code(job, with_code, bundles={SEGMENTATION_BUNDLE: "configs"})  # not its 2 MB demo model
    return job


def _code(job: FedJob, with_code: bool, bundles: dict[str, str]) -> None:
    """Configuration only (the package is installed at every site), or the runtime and ``bundles``
    carried in ``custom/`` (bundle name → the sub-folder carried, ``""``: all of it, as ``custom/<name>``)."""
    if not with_code:
        job.set_app_packages(["modalitybank"])
        return
    import modalitybank

    package = Path(modalitybank.__file__).parent
    job.add_file_to_clients(str(package / "configs"), dest_dir="modalitybank/configs")
    for init in PACKAGE_INITS:  # the Job API copies the modules the classes import, not their packages' __init__
        job.add_file_to_clients(str(package / init), dest_dir=str(Path("modalitybank", init).parent))
    for name, part in bundles.items():
        job.add_file_to_clients(str(bundle_dir(name) / part), dest_dir=str(Path(name, part)))


def make_job(name: str, with_code: bool = False, **args: Any) -> FedJob:
    """The job ``name`` of :data:`JOBS`, its component arguments set from ``args``.

    ``rounds`` sets the GAN jobs' ``iterations`` and the FedAvg job's ``num_rounds``.
    """
    if name not in JOBS:
        raise ValueError(f"no job {name!r}; the app makes {sorted(JOBS)}")
    spec = dict(JOBS[name])
    rounds = args.pop("rounds", None)
    if spec.pop("kind") == "fedavg":
        return fedavg_job(name, with_code=with_code, **spec, **({"num_rounds": rounds} if rounds else {}), **args)
    return gan_job(name, with_code=with_code, **spec, **({"iterations": rounds} if rounds else {}), **args)


def export_jobs(out: str | Path, names: list[str] | None = None, with_code: bool = False,
                **args: Any) -> list[Path]:
    """Write the job folders ``names`` (default: all of :data:`JOBS`) into ``out``; returns their paths."""
    out = Path(out)
    paths = []
    for name in names or list(JOBS):
        make_job(name, with_code=with_code, **args).export_job(str(out))
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", action="append", choices=sorted(JOBS), help="job(s) to make (default: all)")
    parser.add_argument("--export", type=Path, help="write the job folders here")
    parser.add_argument("--with-code", action="store_true", help="carry the package's runtime in custom/")
    parser.add_argument("--simulate", type=Path, metavar="WORKSPACE", help="run the (first) job in the simulator")
    parser.add_argument("--n-clients", type=int, default=3)
    parser.add_argument("--scale", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    a = parser.parse_args(argv)
    args = {"scale": a.scale, "rounds": a.rounds}
    if a.export:
        for path in export_jobs(a.export, a.job, a.with_code, **args):
            print(path)
    if a.simulate:
        job = make_job((a.job or ["modalitybank_multimodal"])[0], a.with_code, **args)
        raise SystemExit(job.simulator_run(str(a.simulate), n_clients=a.n_clients))


if __name__ == "__main__":
    main()
