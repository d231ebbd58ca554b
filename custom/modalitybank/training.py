"""Single-process reference training (AsynDGAN's setting: every site's discriminator in one process).

* :func:`pretrain` — the whole generator, centrally, on the public source set (one modality).
* :func:`train_bank` — the base frozen, one bank entry per target modality learned against one
  discriminator per (site, modality it holds). With ``baseline="asyndgan"`` a plain generator
  with one output channel per modality is trained instead (no bank), for comparison.

Both run :func:`run_gan`, which checkpoints into a run directory and resumes from it. This is
the correctness reference and the speed anchor for the federated version.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from modalitybank import config
from modalitybank.bank import atomic_save
from modalitybank.gan import GanLoss, SiteBatch, SiteModel, gan_step
from modalitybank.networks import ResnetGenerator, build_discriminator, build_generator, mask_channels
from modalitybank.runlog import RunLog
from modalitybank.store import load_generator, read_info, save_generator

__all__ = ["BatchStream", "TrainSettings", "bank_generator", "bank_meta", "make_site_models", "pretrain", "pretrain_generator",
           "pretrain_meta", "run_gan", "train_bank"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings, from a preset's ``train`` section unless overridden."""

    iterations: int
    batch_size: int
    lr: float
    beta1: float
    lambda_l1: float
    checkpoint_every: int
    seed: int = 0
    l1_balance: float = 0.0
    lambda_fm: float = 0.0

    @classmethod
    def from_preset(cls, scale: str, phase: str, **overrides: Any) -> TrainSettings:
        """``phase``: ``"pretrain"`` or ``"bank"`` (which iteration count to take)."""
        t = config.preset(scale)["train"]
        settings = cls(iterations=t[f"{phase}_iterations"], batch_size=t["batch_size"], lr=t["lr"], beta1=t["beta1"],
                       lambda_l1=t["lambda_l1"], checkpoint_every=t["checkpoint_every"],
                       l1_balance=t.get("l1_balance", 0.0), lambda_fm=t.get("lambda_fm", 0.0))
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def adam(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.lr, betas=(self.beta1, 0.999))

    def gan_loss(self) -> GanLoss:
        """The loss weights every GAN loop of these settings uses (``lambda_l1``, ``l1_balance``, ``lambda_fm``)."""
        return GanLoss(lambda_l1=self.lambda_l1, l1_balance=self.l1_balance, lambda_fm=self.lambda_fm)


def make_site_models(site_modalities: Mapping[str, Sequence[str]], model: Mapping[str, Any],
                     settings: TrainSettings, spatial_dims: int = 2) -> dict[str, SiteModel]:
    """One conditional discriminator (and Adam) per modality each site holds."""
    sites = {}
    for name, modalities in site_modalities.items():
        discriminators = {m: build_discriminator(dict(model), spatial_dims) for m in modalities}
        sites[name] = SiteModel(discriminators, {m: settings.adam(list(d.parameters())) for m, d in discriminators.items()})
    return sites


class BatchStream:
    """Endless shuffled batches of one site's slices, as :class:`SiteBatch` (mask channels + reals).

    ``dataset`` items are dicts with ``image (C, H, W)``, ``label (H, W)``, ``brain (H, W)``; its
    ``modalities`` name the image channels, unless ``names`` renames them (the non-brain source's
    images sit in the loader's ``t1c`` slot but are the base's ``cine``).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, names: Sequence[str] | None = None) -> None:
        self.modalities: list[str] = list(dataset.modalities if names is None else names)  # type: ignore[attr-defined]
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            raise ValueError("a site has no training slices")
        generator = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(dataset, batch_size=min(batch_size, size), shuffle=True, drop_last=True,
                                  generator=generator)
        self._it: Iterator[dict[str, torch.Tensor]] = iter(())

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> SiteBatch:
        try:
            item = next(self._it)
        except StopIteration:
            self._it = iter(self._loader)
            item = next(self._it)
        reals = {m: item["image"][:, i : i + 1] for i, m in enumerate(self.modalities)}
        return SiteBatch(mask=mask_channels(item["label"], item["brain"]), reals=reals, label=item["label"],
                         brain=item["brain"])


def _state_of(sites: Mapping[str, SiteModel]) -> dict[str, Any]:
    return {s: {m: {"d": site.discriminators[m].state_dict(), "opt": site.optimizers[m].state_dict()}
                for m in site.modalities} for s, site in sites.items()}


def run_gan(run_dir: Path, generator: torch.nn.Module, g_optimizer: torch.optim.Optimizer,
            sites: Mapping[str, SiteModel], streams: Mapping[str, Iterator[SiteBatch]], settings: TrainSettings,
            save_generator_fn: Callable[[], None], desc: str, progress: bool = True) -> dict[str, Any]:
    """Run :func:`gan_step` for ``settings.iterations`` iterations, checkpointing into ``run_dir``.

    ``run_dir/state.pt`` holds the iteration, optimisers and discriminators; the generator is
    saved by ``save_generator_fn`` before it. A run that finds ``state.pt`` resumes from it
    (the caller has loaded the generator from ``run_dir``). Per-iteration losses go to
    ``metrics.jsonl`` and TensorBoard (``run_dir/tb``).
    """
    from torch.utils.tensorboard import SummaryWriter

    state_path = run_dir / "state.pt"
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        start = state["iteration"]
        g_optimizer.load_state_dict(state["g_opt"])
        for s, site in sites.items():
            for m in site.modalities:
                site.discriminators[m].load_state_dict(state["sites"][s][m]["d"])
                site.optimizers[m].load_state_dict(state["sites"][s][m]["opt"])
    loss = settings.gan_loss()
    writer = SummaryWriter(str(run_dir / "tb"))
    t0 = time.perf_counter()

    def checkpoint(iteration: int) -> None:
        save_generator_fn()
        atomic_save({"iteration": iteration, "g_opt": g_optimizer.state_dict(), "sites": _state_of(sites),
                     "settings": asdict(settings)}, state_path)

    bar = tqdm(range(start, settings.iterations), desc=desc, initial=start, total=settings.iterations,
               disable=not progress, unit="it", dynamic_ncols=True)
    with RunLog(run_dir, start) as log:  # iterations after the last checkpoint are redone
        for iteration in bar:
            batches = {s: next(streams[s]) for s in sites}
            report = gan_step(generator, g_optimizer, sites, batches, loss)
            mean = log.write(iteration + 1, report)
            for k, v in mean.items():
                writer.add_scalar(f"loss/{k}", v, iteration + 1)
            bar.set_postfix(d=f"{mean['d']:.3f}", g_l1=f"{mean['g_l1']:.3f}")
            if (iteration + 1) % settings.checkpoint_every == 0 and iteration + 1 < settings.iterations:
                checkpoint(iteration + 1)
    checkpoint(settings.iterations)
    writer.close()
    return {"iterations": settings.iterations, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 2)}


def _datasets():  # imported lazily: the loader pulls in nibabel and scans folders
    from modalitybank.data import brats

    return brats


def _resuming(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "state.pt").is_file()


def pretrain_generator(run_dir: str | Path, scale: str = "tiny", source: str = "lgg") -> ResnetGenerator:
    """The generator to pre-train: the one in ``run_dir`` when it holds an unfinished run, else a fresh
    one sized by preset ``scale``, its base modality the source set's (``experiments.json`` →
    ``pretrain_sources.<source>.base_modality``: ``t1c`` for ``lgg`` / ``hgg``, ``cine`` for
    ``nonbrain``, so a cardiac base never passes for a brain modality). Every weight trains."""
    if _resuming(run_dir):
        generator = load_generator(run_dir)
    else:
        generator = build_generator(config.preset(scale)["model"],
                                    base_modality=config.pretrain_source(source)["base_modality"])
    return generator.requires_grad_(True)


def bank_generator(run_dir: str | Path, pretrained: str | Path, targets: Sequence[str]) -> ResnetGenerator:
    """The generator whose bank entries ``targets`` are learned: ``run_dir``'s when it holds an unfinished
    run, else the pre-trained one in ``pretrained``; ``bank.learn(targets)``: an identity entry added per
    missing target, the base and every other entry frozen."""
    generator = load_generator(run_dir if _resuming(run_dir) else pretrained)
    generator.bank.learn(list(targets))
    return generator


def bank_meta(pretrained: str | Path, experiment: str, scale: str, data_root: str | Path,
              run_dir: str | Path | None = None) -> dict[str, Any]:
    """``generator.json`` provenance of a bank run, as :func:`modalitybank.training.train_bank` writes it."""
    source = run_dir if run_dir is not None and _resuming(run_dir) else pretrained
    return {"stage": "bank", "pretrained_from": str(pretrained), "pretrained_on": read_info(source).get("pretrained_on"),
            "experiment": experiment, "sites": config.experiment(experiment)["sites"], "scale": scale,
            "data_root": str(data_root), "image_size": config.preset(scale)["slices"]["image_size"]}


def pretrain_meta(scale: str, data_root: str | Path, source: str = "lgg",
                  source_root: str | Path | None = None) -> dict[str, Any]:
    """``generator.json`` provenance of a pre-training run, as :func:`modalitybank.training.pretrain` writes it:
    ``pretrained_on`` names the source (``{"source": "lgg", "grade": "LGG", "modality": "t1c", ...}``)."""
    on = {"source": source, **config.experiment("pretrain")} if source == "lgg" else {"source": source}
    on.update({k: v for k, v in config.pretrain_source(source).items() if k not in on})
    meta = {"stage": "pretrained", "pretrained_on": on, "scale": scale, "data_root": str(data_root),
            "image_size": config.preset(scale)["slices"]["image_size"]}
    if source_root is not None:
        meta["source_root"] = str(source_root)
    return meta


def pretrain(run_dir: str | Path, data_root: str | Path, scale: str = "tiny", cache_dir: str | Path | None = None,
             progress: bool = True, source: str = "lgg", **overrides: Any) -> dict[str, Any]:
    """Pre-train the whole generator on a source set (``configs/experiments.json`` → ``pretrain_sources``).

    Args:
        run_dir: where the generator, checkpoints and logs go (resumes if it holds a run).
        data_root: for ``source="lgg"`` the phantom (or real BraTS) root, whose ``LGG/`` is read. For
            ``"hgg"`` / ``"nonbrain"``: a source set made by ``modalitybank data source``
            (:func:`modalitybank.data.sources.make_source`), or a phantom root (the set is then read
            from, and built on demand in, ``<root>/sources/<source>`` at the phantom's scale and seed),
            or a missing / empty folder (built there at ``scale``, data seed = ``seed``).
        scale: size preset.
        source: ``"lgg"`` (default, the behaviour before the ablation), ``"hgg"`` or ``"nonbrain"``.
            ``generator.json`` records it under ``pretrained_on``; the base's modality name is the
            source's ``base_modality`` (``cine`` for ``nonbrain``).
        overrides: :class:`TrainSettings` fields (``iterations``, ``seed``, ...).
    """
    # through importlib: the source builders (phantom, cardiac) are not traced into a job's custom/ code
    resolve_source_root = importlib.import_module("modalitybank.data.sources").resolve_source_root
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings.from_preset(scale, "pretrain", **overrides)
    pre = config.pretrain_source(source)
    model = config.preset(scale)["model"]
    root = resolve_source_root(data_root, source, scale=scale, seed=settings.seed, build=True, progress=progress)
    dataset = _datasets().source_dataset(root, scale, cache_dir=cache_dir, source=source)
    torch.manual_seed(settings.seed)
    generator = pretrain_generator(run_dir, scale, source)
    base = pre["base_modality"]
    sites = make_site_models({"source": [base]}, model, settings)
    streams = {"source": BatchStream(dataset, settings.batch_size, settings.seed, names=[base])}
    meta = pretrain_meta(scale, data_root, source, None if source == "lgg" else root)
    summary = run_gan(run_dir, generator, settings.adam(list(generator.parameters())), sites, streams, settings,
                      lambda: save_generator(generator, run_dir, meta), desc=f"pre-train ({source})", progress=progress)
    return {**summary, "run_dir": str(run_dir), "slices": len(dataset), "source": source}


def train_bank(run_dir: str | Path, data_root: str | Path, pretrained: str | Path | None, scale: str = "tiny",
               experiment: str = "multimodal", baseline: str | None = None, cache_dir: str | Path | None = None,
               progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Learn one bank entry per target modality of ``experiment`` against per-site discriminators.

    Args:
        run_dir: where the generator, checkpoints and logs go (resumes if it holds a run).
        data_root: BraTS-layout folder (the phantom or real BraTS 2018).
        pretrained: folder of the pre-trained generator (``pretrain``'s run dir); unused for the
            AsynDGAN baseline, which trains a plain multi-channel generator from scratch.
        scale: size preset.
        experiment: ``multimodal`` (Table I) or ``missing_modality`` (Table II).
        baseline: ``None`` (ModalityBank) or ``"asyndgan"``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings.from_preset(scale, "bank", **overrides)
    exp = config.experiment(experiment)
    model = config.preset(scale)["model"]
    datasets = _datasets().site_datasets(data_root, experiment, scale, cache_dir=cache_dir)
    torch.manual_seed(settings.seed)
    resuming = (run_dir / "state.pt").is_file()
    targets = list(exp["targets"])
    if baseline == "asyndgan":
        generator = load_generator(run_dir) if resuming else build_generator(model, output_modalities=targets)
        learned = list(generator.parameters())
        meta: dict[str, Any] = {"stage": "asyndgan", "experiment": experiment, "sites": exp["sites"], "scale": scale,
                                "data_root": str(data_root), "image_size": config.preset(scale)["slices"]["image_size"]}
    elif baseline is None:
        if pretrained is None:
            raise ValueError("ModalityBank needs a pre-trained generator (run `modalitybank pretrain` first)")
        generator = bank_generator(run_dir, pretrained, targets)
        learned = [p for name in targets for p in generator.bank.entry_parameters(name)]
        meta = bank_meta(pretrained, experiment, scale, data_root, run_dir)
    else:
        raise ValueError(f"unknown baseline {baseline!r} (choose 'asyndgan')")
    sites = make_site_models(exp["sites"], model, settings)
    streams = {s: BatchStream(datasets[s], settings.batch_size, settings.seed + i) for i, s in enumerate(exp["sites"])}
    summary = run_gan(run_dir, generator, settings.adam(learned), sites, streams, settings,
                      lambda: save_generator(generator, run_dir, meta), desc=f"{baseline or 'bank'} {experiment}",
                      progress=progress)
    return {**summary, "run_dir": str(run_dir), "slices": {s: len(d) for s, d in datasets.items()}}
