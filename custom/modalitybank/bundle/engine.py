"""A MONAI engine around the project's one GAN step, so the generator bundle trains like any bundle.

:class:`GanTrainer` is a ``monai.engines.SupervisedTrainer`` (an ignite ``Engine``) whose iteration is
:func:`modalitybank.gan.gan_step`: every site's discriminator step on fakes of each modality it holds,
then one generator step. A bundle's config defines ``network`` (the generator), ``optimizer`` (over
what the generator learns) and ``trainer`` by id, so ``--trainer#max_epochs 2`` or
``--optimizer#lr 1e-4`` override them as in any MONAI bundle, and MONAI handlers
(``StatsHandler``, ``TensorBoardStatsHandler``, ...) attach to it.

:class:`GanCheckpoint` keeps the behaviour of :func:`modalitybank.training.run_gan`: the generator in
the store layout and ``state.pt`` (iteration, optimisers, discriminators) in the run directory at
every epoch's end, ``metrics.jsonl`` per iteration, and a resume from ``state.pt`` — the same files,
so a run started by ``modalitybank pretrain`` / ``train-local`` resumes in the bundle and back.

The builders (:func:`pretrain_generator`, :func:`bank_generator`, :func:`site_models`,
:class:`SiteBatches`) set up what :func:`modalitybank.training.pretrain` and
:func:`~modalitybank.training.train_bank` set up, from the same presets and experiments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys
from torch import nn
from torch.utils.data import Dataset

from modalitybank import config
from modalitybank.bank import atomic_save
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, gan_step
from modalitybank.networks import ResnetGenerator
from modalitybank.runlog import RunLog, mean_losses
from modalitybank.store import save_generator
from modalitybank.training import (  # re-exported: the generator bundle's configs call them from here
    BatchStream,
    TrainSettings,
    bank_generator,
    bank_meta,
    make_site_models,
    pretrain_generator,
    pretrain_meta,
)

__all__ = ["GanCheckpoint", "GanTrainer", "SiteBatches", "bank_generator", "bank_meta", "entry_parameters",
           "pretrain_generator", "pretrain_meta", "site_models"]


class SiteBatches:
    """Endless ``{site: SiteBatch}``: one batch of every site per iteration (the engine's data loader).

    Args:
        streams: ``{site: iterator of SiteBatch}``, e.g. :class:`~modalitybank.training.BatchStream`.
    """

    def __init__(self, streams: Mapping[str, Iterator[SiteBatch]]) -> None:
        self.streams = dict(streams)

    @classmethod
    def from_datasets(cls, datasets: Mapping[str, Dataset], batch_size: int, seed: int = 0) -> SiteBatches:
        """Shuffled batches of each site's slices (site ``i`` seeded ``seed + i``, as ``train_bank`` does).

        Args:
            datasets: ``{site: SiteDataset}`` (``modalitybank.data.brats.site_datasets`` /
                ``source_dataset``); items ``{"image": (C, S, S), "label": (S, S), "brain": (S, S)}``.
            batch_size: slices per batch (at most the site's slice count).
            seed: shuffling seed.
        """
        return cls({s: BatchStream(d, batch_size, seed + i) for i, (s, d) in enumerate(datasets.items())})

    def __iter__(self) -> SiteBatches:
        return self

    def __next__(self) -> dict[str, SiteBatch]:
        return {site: next(stream) for site, stream in self.streams.items()}


def _to(batch: SiteBatch, device: torch.device) -> SiteBatch:
    return SiteBatch(mask=batch.mask.to(device), reals={m: r.to(device) for m, r in batch.reals.items()},
                     label=batch.label, brain=batch.brain)


class GanTrainer(SupervisedTrainer):
    """ModalityBank's GAN training as a MONAI trainer: each iteration is :func:`modalitybank.gan.gan_step`.

    Args:
        device: where the generator, the discriminators and the batches are.
        max_epochs: epochs to train; the run lasts ``max_epochs * epoch_length`` iterations.
        train_data_loader: an iterable of ``{site: SiteBatch}`` (:class:`SiteBatches`); ``SiteBatch``
            holds mask channels ``(N, 5, S, S)`` and real images ``{modality: (N, 1, S, S)}`` in [-1, 1].
        network: the generator, ``generate(mask, modalities) -> {modality: (N, 1, S, S)}``
            (a :class:`~modalitybank.networks.ResnetGenerator`).
        optimizer: optimiser over what the generator learns: every weight in pre-training, the bank
            entries being learned afterwards.
        sites: ``{site: SiteModel}``: one discriminator and optimiser per modality each site holds.
        gan_loss: loss weights (LSGAN + ``lambda_l1`` · L1).
        epoch_length: iterations per epoch (required: the data loader is endless).
        train_handlers: MONAI / ignite handlers to attach (e.g. :class:`GanCheckpoint`, ``StatsHandler``).
        kwargs: further ``SupervisedTrainer`` arguments (``amp``, ``event_names``, ...).

    The engine output of an iteration (``engine.state.output``) is ``{"losses": {"<site>/<modality>":
    {"d", "g_adv", "g_l1", "g"}}, "mean": {"d", "g_adv", "g_l1"} averaged over them, "loss": the mean
    generator loss}``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Any, network: nn.Module,
                 optimizer: torch.optim.Optimizer, sites: Mapping[str, SiteModel], gan_loss: GanLoss | None = None,
                 epoch_length: int | None = None, train_handlers: Sequence | None = None, **kwargs: Any) -> None:
        if epoch_length is None and not hasattr(train_data_loader, "__len__"):
            raise ValueError("GanTrainer needs epoch_length: its data loader (SiteBatches) is endless")
        gan_loss = GanLoss() if gan_loss is None else gan_loss
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=gan_loss, epoch_length=epoch_length,
                         train_handlers=train_handlers, **kwargs)
        self.sites = dict(sites)
        self.gan_loss = gan_loss

    def _iteration(self, engine: GanTrainer, batchdata: Mapping[str, SiteBatch]) -> dict[str, Any]:
        batches = {site: _to(batch, engine.state.device) for site, batch in batchdata.items()}
        report = gan_step(engine.network, engine.optimizer, engine.sites, batches, engine.gan_loss)
        loss_g = sum(r["g"] for r in report.values()) / len(report)
        return {"losses": report, "mean": mean_losses(report), CommonKeys.LOSS: loss_g}


class GanCheckpoint:
    """Checkpoint, log and resume a :class:`GanTrainer` run in ``run_dir``, as ``training.run_gan`` does.

    * at the start: if ``run_dir/state.pt`` exists, load the generator optimiser and every site's
      discriminator and optimiser from it and continue at its iteration (the generator itself is
      loaded by :func:`pretrain_generator` / :func:`bank_generator`, which read ``run_dir`` first);
      log lines after that iteration are dropped;
    * every iteration: one line of ``metrics.jsonl`` (:class:`modalitybank.runlog.RunLog`:
      ``{"iteration", "losses", "mean"}``, as every GAN loop of the project writes it);
    * at every epoch's end and at completion: the generator (store layout, with ``meta`` in
      ``generator.json``), then ``state.pt`` (``{"iteration", "g_opt", "sites", "settings"}``).

    Args:
        run_dir: the run directory.
        meta: provenance written into ``generator.json`` (stage, data, experiment, ...).
        settings: the run's settings, stored in ``state.pt``.
    """

    def __init__(self, run_dir: str | Path, meta: Mapping[str, Any], settings: TrainSettings | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)
        self.settings = settings
        self.resumed_from = 0
        self._log: RunLog | None = None

    def attach(self, engine: GanTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.log)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.close)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    def resume(self, engine: GanTrainer) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if self.state_path.is_file():
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            start = int(state["iteration"])
            engine.optimizer.load_state_dict(state["g_opt"])
            for s, site in engine.sites.items():
                for m in site.modalities:
                    site.discriminators[m].load_state_dict(state["sites"][s][m]["d"])
                    site.optimizers[m].load_state_dict(state["sites"][s][m]["opt"])
            engine.state.iteration = start
            engine.state.epoch = start // engine.state.epoch_length
        self.resumed_from = start
        self._log = RunLog(self.run_dir, start)  # iterations after the last checkpoint are redone

    def log(self, engine: GanTrainer) -> None:
        if self._log is not None:
            self._log.write(engine.state.iteration, engine.state.output["losses"])

    def close(self, engine: GanTrainer, *args: Any) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def save(self, engine: GanTrainer) -> None:
        save_generator(engine.network, self.run_dir, self.meta)
        sites = {s: {m: {"d": site.discriminators[m].state_dict(), "opt": site.optimizers[m].state_dict()}
                     for m in site.modalities} for s, site in engine.sites.items()}
        atomic_save({"iteration": engine.state.iteration, "g_opt": engine.optimizer.state_dict(), "sites": sites,
                     "settings": asdict(self.settings) if self.settings is not None else None}, self.state_path)


def entry_parameters(generator: ResnetGenerator, targets: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of the bank entries ``targets`` (what the bank optimiser learns)."""
    return [p for name in targets for p in generator.bank.entry_parameters(name)]


def site_models(site_modalities: Mapping[str, Sequence[str]], scale: str, settings: TrainSettings,
                device: str | torch.device = "cpu") -> dict[str, SiteModel]:
    """One discriminator and Adam per (site, modality it holds), sized by preset ``scale``, on ``device``
    (:func:`modalitybank.training.make_site_models`)."""
    sites = make_site_models(site_modalities, config.preset(scale)["model"], settings)
    for site in sites.values():
        for d in site.discriminators.values():
            d.to(device)
    return sites


def run_summary(trainer: GanTrainer, checkpoint: GanCheckpoint) -> dict[str, Any]:
    """What a run did: iterations, where it resumed, the last mean losses, its directory."""
    out = trainer.state.output or {}
    return {"iterations": trainer.state.iteration, "resumed_from": checkpoint.resumed_from,
            "last_losses": {k: round(v, 5) for k, v in out.get("mean", {}).items()}, "run_dir": str(checkpoint.run_dir)}
