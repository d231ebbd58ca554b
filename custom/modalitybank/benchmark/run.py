"""``modalitybank benchmark``: the paper's Tables I-III, every stage on the real components.

Stages, each computed once in the workdir and shared by the rows and tables that need it:

1. ``data`` — the BraTS-like phantom (unless ``--data`` names a BraTS-layout folder);
2. ``pretrain/<source>`` — the generator's base pre-trained centrally on a public source set
   (LGG-like T1c; for Table III also an HGG-like T1c pool and a non-brain phantom);
3. ``gan/...`` — the bank (and the AsynDGAN baseline) learned **through NVFlare** (the simulator
   job of ``jobs/``, three hospital sites);
4. ``synth/...`` — synthetic cases from the training masks of all sites, or a centre's cases
   completed with its missing modality;
5. ``seg/<recipe>-seed<k>`` — one segmentation network per row through the ``tumor_segmentation``
   bundle (FedAvg-All: the same bundle inside NVFlare's FedAvg), all with the same budget, all
   evaluated on the same held-out real test cases.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modalitybank import config
from modalitybank.benchmark import segment
from modalitybank.benchmark.plan import Budget, Row, Table, iterations_variant, load_table, privacy_variant
from modalitybank.benchmark.results import write_results
from modalitybank.benchmark.settings import check_settings, settings_of
from modalitybank.benchmark.stages import Stages

__all__ = ["Benchmark", "run_benchmark"]


class Benchmark:
    """One table's run in ``workdir`` (see the module docstring for the stages)."""

    def __init__(self, table: Table, scale: str, workdir: Path, data: Path | None = None,
                 test_data: Path | None = None, seeds: int = 1, progress: bool = True,
                 gan_iterations: int | None = None, privacy: dict[str, Any] | None = None,
                 bank_iterations: int | None = None) -> None:
        self.table, self.scale, self.work = table, scale, workdir
        self.privacy = privacy  # the sites' privacy settings while the GANs learn (None: the paper's, standard)
        self.variant = privacy_variant(privacy) + iterations_variant(bank_iterations)
        self.gan_iterations = gan_iterations  # None: the preset's (pre-training and bank alike)
        self.bank_iterations = bank_iterations  # None: gan_iterations, else the preset's (the federated GANs only)
        self.budget = Budget.of(scale)
        self.own_data = data is None
        self.data = (workdir / "data") if data is None else data.resolve()
        self.train_split = "all" if test_data is not None else "train"
        self.test_root, self.val_split = (test_data.resolve(), "all") if test_data is not None else (self.data, "test")
        self.seeds = list(range(seeds))
        self.cache = workdir / "cache"
        self.stages = Stages(workdir, self._planned(), progress)

    # -- the plan -----------------------------------------------------------------------------------
    def _learned(self, row: Row) -> str:
        """The privacy suffix of a row whose images come from a GAN learned with the sites (else ``""``)."""
        return self.variant if row.generator in ("bank", "asyndgan") else ""

    def _seg_name(self, row: Row, seed: int) -> str:
        return f"seg/{row.key}-seed{seed}{self._learned(row)}"

    def _gan_name(self, row: Row, seed: int) -> str:
        return f"gan/{row.generator_key}-seed{seed}{self._learned(row)}"

    def _synth_name(self, row: Row, seed: int) -> str:
        suffix = f"-completed-{'+'.join(row.centres or ())}" if row.train == "completed" else ""
        return f"synth/{row.generator_key}-seed{seed}{self._learned(row)}{suffix}"

    def _planned(self) -> list[tuple[str, str]]:
        plan: list[tuple[str, str]] = [("data", "data")] if self.own_data else []
        for seed in self.seeds:
            for row in self.table.rows:
                if row.generator == "bank":
                    plan.append(("pretrain", f"pretrain/{row.source}"))
                if row.generator == "resampled":
                    plan.append(("synth", self._synth_name(row, 0)))
                elif row.generator:
                    plan += [("gan", self._gan_name(row, seed)), ("synth", self._synth_name(row, seed))]
                plan.append(("fedavg" if row.train == "fedavg" else "seg", self._seg_name(row, seed)))
        return list(dict.fromkeys(plan))

    # -- stages -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.own_data:
            from modalitybank.data.phantom import make_phantom

            self.stages.run("data", "data", lambda f: {"cases": make_phantom(f, scale=self.scale, seed=0,
                                                                             progress=False)["cases"]})

    def pretrained(self, source: str) -> Path:
        from modalitybank.training import pretrain

        def build(folder: Path) -> dict[str, Any]:
            if source == "lgg":
                return pretrain(folder, self.data, scale=self.scale, cache_dir=self.cache, progress=False,
                                **self._iterations())
            from modalitybank.data.sources import make_source

            root = self.work / "sources" / source
            make_source(root, source, scale=self.scale, seed=0, progress=False)
            return pretrain(folder, root, scale=self.scale, cache_dir=self.cache, progress=False, source=source,
                            **self._iterations())

        self.stages.run("pretrain", f"pretrain/{source}", build)
        return self.stages.path(f"pretrain/{source}")

    def _iterations(self) -> dict[str, int]:
        return {"iterations": self.gan_iterations} if self.gan_iterations else {}

    def generator(self, row: Row, seed: int) -> Path:
        """The run folder of the generator ``row`` synthesises with, learned on NVFlare (3 sites)."""
        from modalitybank.fl.jobs import simulate
        from modalitybank.report import report_run

        if row.generator == "bank":
            job, extra = f"modalitybank_{row.experiment}", {"pretrained": str(self.pretrained(row.source or "lgg"))}
        else:
            job, extra = "asyndgan", {}

        rounds = self.bank_iterations or self.gan_iterations

        def learn(folder: Path) -> dict[str, Any]:
            continued = self._continue_shorter(row, seed, folder)
            if self.privacy:  # every site's own settings, as a hospital sets them (the job cannot)
                steps = rounds or config.preset(self.scale)["train"]["bank_iterations"]
                own = {**self.privacy, "steps": steps} if self.privacy["mode"] == "dp" else self.privacy
                (folder / "site_config.json").write_text(json.dumps({"default": {"privacy": own}}))
                extra["site_config"] = folder / "site_config.json"
            fl = simulate(job, folder, scale=self.scale, rounds=rounds, progress=False,
                          data_root=str(self.data), cache_dir=str(self.cache), seed=seed, **extra)
            report = report_run(fl["checkpoint"], self.data, self.scale, row.experiment, cache_dir=self.cache)
            return {"checkpoint": fl["checkpoint"], "accepted_iterations": fl["rounds"], "sites": fl["sites"],
                    "quality": report["quality"], "figure": report["figure"], "loss_curves": report["loss_curves"],
                    "continued_from": continued}

        return Path(self.stages.run("gan", self._gan_name(row, seed), learn)["checkpoint"])

    def _continue_shorter(self, row: Row, seed: int, folder: Path) -> str | None:
        """Seed ``folder`` (a GAN stage of ``bank_iterations``) with the longest shorter finished GAN of the same
        recipe in the workdir: its generator checkpoint and the sites' discriminators, which the simulator then
        resumes. The learning rate is constant, so continuing is training longer. Returns that stage's name."""
        from modalitybank.fl.jobs import read_run

        if (folder / "checkpoint").exists() or not self.bank_iterations:  # an interrupted run resumes itself
            return None
        base = f"gan/{row.generator_key}-seed{seed}{privacy_variant(self.privacy)}"
        shorter = []
        for name in [base, *(f"gan/{p.name}" for p in self.work.glob(f"{base}-it*"))]:
            run = read_run(self.stages.path(name) / "checkpoint") if self.stages.done(name) else None
            if run and run["status"] == "completed" and run["iterations"] < self.bank_iterations:
                shorter.append((run["iterations"], name))
        if not shorter:
            return None
        name = max(shorter)[1]
        source = self.stages.path(name)
        shutil.copytree(source / "checkpoint", folder / "checkpoint")
        sites = [p for p in (source / "sites").glob("*") if p.is_dir()]
        # a stage made before the sites kept their state outside the simulator's workspace
        sites = sites or [p.parent for p in (source / "workspace").glob("*/modalitybank")]
        for site in sites:
            shutil.copytree(site / "modalitybank", folder / "sites" / site.name / "modalitybank")
        return name

    def synthetic_datalist(self, row: Row, seed: int) -> str:
        from modalitybank.synthesis import synthesize_cases, synthesize_run

        completed = row.train == "completed"
        if row.generator == "resampled":
            def resample(folder: Path) -> dict[str, Any]:
                size = config.preset(self.scale)["slices"]["image_size"]
                return synthesize_cases(None, self.data, folder, self.table.modalities, size, split=self.train_split,
                                        centres=row.centres, progress=False)

            return self.stages.run("synth", self._synth_name(row, 0), resample)["datalist"]
        checkpoint = self.generator(row, seed)

        def synthesize(folder: Path) -> dict[str, Any]:
            return synthesize_run(checkpoint, self.data, folder, self.table.modalities,
                                  experiment=row.experiment if completed else None, split=self.train_split,
                                  keep_real=completed, centres=row.centres, progress=False)

        return self.stages.run("synth", self._synth_name(row, seed), synthesize)["datalist"]

    def real_datalist(self, row: Row, folder: Path) -> str:
        from modalitybank.bundle.segmentation import brats_datalist

        path = folder / "datalist.json"
        brats_datalist(self.data, self.table.modalities, path, sections={"training": self.train_split},
                       centres=row.centres, present=row.present)
        return str(path)

    def segment(self, row: Row, seed: int) -> dict[str, Any]:
        """Train (or federate) and evaluate ``row``'s segmentation network; per-case metrics."""
        datalist = self.synthetic_datalist(row, seed) if row.generator else None

        def run(folder: Path) -> dict[str, Any]:
            start = time.perf_counter()
            if row.train == "fedavg":
                models = self._fedavg(row, seed, folder)
            else:
                models = segment.train(datalist or self.real_datalist(row, folder), folder, self.table.modalities,
                                       self.budget, seed).parent
            trained = time.perf_counter() - start
            present = row.present if row.train == "real" else None  # a network trained without a modality is
            metrics = segment.evaluate(models, self.test_root, self.val_split, folder / "eval",  # tested without it
                                       self.table.modalities, present)
            case = self.example_case(present)
            segment.example_prediction(models, case, self.table.modalities, folder)
            return {**metrics, "train_seconds": round(trained, 1), "example_case": case["case"]}

        kind = "fedavg" if row.train == "fedavg" else "seg"
        return self.stages.run(kind, self._seg_name(row, seed), run)

    def _fedavg(self, row: Row, seed: int, folder: Path) -> Path:
        from modalitybank.fl.segmentation import run_fedavg

        fl = run_fedavg(folder / "federated", row.experiment, self.data, self.scale,
                        num_rounds=self.budget.fedavg_rounds, local_iterations=self.budget.local_iterations,
                        seed=seed, num_samples=self.budget.num_samples, learning_rate=self.budget.learning_rate,
                        batch_size=self.budget.batch_size)
        return Path(fl["bundle_model"]).parent

    def example_case(self, present: Sequence[str] | None = None) -> dict[str, Any]:
        """The first held-out test case: the one every row's example segmentation shows."""
        from modalitybank.bundle.segmentation import brats_datalist

        cases = brats_datalist(self.test_root, self.table.modalities, sections={"test": self.val_split},
                               present=present)["test"]
        if not cases:
            raise ValueError(f"{self.test_root}: no test cases (split {self.val_split!r})")
        return cases[0]

    # -- the whole table ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.prepare_data()
        results: dict[str, list[dict[str, Any]]] = {}
        for seed in self.seeds:
            for row in self.table.rows:
                results.setdefault(row.name, []).append(self.segment(row, seed))
        gans = {n: s["result"] for _, n in self.stages.planned if n.startswith("gan/") and (s := self.stages.done(n))}
        seg_dirs = {row.name: self.stages.path(self._seg_name(row, self.seeds[0])) for row in self.table.rows}
        return write_results(self.table, self.work, results, seg_dirs, gans, self.stages.summary(),
                             seconds=time.perf_counter() - start, scale=self.scale,
                             example_modality=_example_modality(self.table.modalities),
                             stem=f"table{self.table.number}{self.variant}", privacy=self.privacy)


def _example_modality(modalities: Sequence[str]) -> int:
    from modalitybank.benchmark.plan import benchmark_config

    wanted = benchmark_config().get("example_modality", modalities[-1])
    return list(modalities).index(wanted) if wanted in modalities else len(modalities) - 1


def run_benchmark(table: int, scale: str, workdir: str | Path, data: str | Path | None = None,
                  test_data: str | Path | None = None, seeds: int = 1, rows: Sequence[str] | None = None,
                  progress: bool = True, gan_iterations: int | None = None,
                  privacy: dict[str, Any] | None = None, adopt_workdir: bool = False,
                  bank_iterations: int | None = None) -> dict[str, Any]:
    """Run table ``table`` at ``scale`` in ``workdir`` (resuming what an earlier run there finished).

    ``gan_iterations`` overrides the preset's pre-training and bank iterations (a quick look; a
    workdir's settings record it). ``bank_iterations`` sets the federated GANs' iterations only, in stages
    of their own beside the preset's (``gan/...-it<N>``, ``table<N>-it<N>...``); such a GAN continues the
    longest shorter GAN of its recipe finished in the workdir. ``privacy``: every site's privacy
    settings while the GANs learn (``{"mode": "adversarial"}``, ``{"mode": "dp", "epsilon": 8}``; see
    :func:`modalitybank.dp.resolve_privacy`): the synthetic rows then show what that mode costs
    downstream, in ``table<N>-<mode>...`` files beside the standard table (real rows are shared).
    A workdir is for one set of settings (preset, segmentation budget, bundle versions, data): see
    :mod:`modalitybank.benchmark.settings` (``adopt_workdir``: record them for a workdir made before).

    Returns ``{"table", "rows": {name: {"dice", "dice_std", "sens", "spec", "hd95", ...}}, "seconds",
    "files"}`` (dice/sens/spec as fractions, hd95 in mm).
    """
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: need at least 1")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, settings_of(scale, Path(data).resolve() if data else None,
                                     Path(test_data).resolve() if test_data else None, gan_iterations), adopt_workdir)
    bench = Benchmark(load_table(table, rows), scale, work, Path(data) if data else None,
                      Path(test_data) if test_data else None, seeds, progress, gan_iterations, privacy,
                      bank_iterations)
    (work / f"table{table}{bench.variant}_plan.json").write_text(json.dumps(bench.stages.planned, indent=1))
    return bench.run()
