"""The ``modalitybank`` command.

Each long command shows progress on stderr and writes into a run directory; commands that take
``--json`` print one JSON object as their last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from modalitybank import config
from modalitybank.data.default import CACHE_ROOT  # the shared cache ($MODALITYBANK_HOME)

DEFAULT_CACHE = CACHE_ROOT / "slices"


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")


# -- commands ---------------------------------------------------------------------------------
def cmd_phantom(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.data.phantom import make_phantom

    summary = make_phantom(a.out, scale=a.scale, seed=a.seed, progress=not a.quiet)
    return {"root": str(a.out), "scale": a.scale, "seed": a.seed,
            "cases": {k: len(v) for k, v in summary["cases"].items()}, "test": len(summary["test"]),
            "lgg": len(summary["lgg"])}


def cmd_source(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.data.sources import make_source

    summary = make_source(a.out, a.kind, scale=a.scale, seed=a.seed, progress=not a.quiet, count=a.cases)
    return {"root": str(a.out), "source": a.kind, "scale": a.scale, "seed": a.seed, "cases": len(summary["cases"]),
            "grade": summary["grade"]}


def cmd_split(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.data.sites import split_sites

    sites: int | list[str] = a.names.split(",") if a.names else a.sites
    folders = split_sites(a.data, a.out, sites, split=a.split, seed=a.seed, grades=a.grades)
    return {"sites": {k: str(v) for k, v in folders.items()}, "site_config": str(Path(a.out) / "modalitybank_site.json")}


def cmd_pretrain(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.training import pretrain

    return pretrain(a.run_dir, a.data, scale=a.scale, cache_dir=a.cache_dir, progress=not a.quiet,
                    source=getattr(a, "source", "lgg"), iterations=a.iterations, seed=a.seed)


def cmd_train_local(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.report import report_run
    from modalitybank.training import train_bank

    result = train_bank(a.run_dir, a.data, a.pretrained, scale=a.scale, experiment=a.experiment,
                        baseline=a.baseline, cache_dir=a.cache_dir, progress=not a.quiet,
                        iterations=a.iterations, seed=a.seed)
    report = report_run(a.run_dir, a.data, a.scale, a.experiment, cache_dir=a.cache_dir)
    return {**result, "quality": report["quality"], "figure": report["figure"], "loss_curves": report["loss_curves"]}


def cmd_report(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.data.default import default_phantom
    from modalitybank.report import report_run

    data = a.data or default_phantom(a.scale)
    cache = a.cache_dir or (DEFAULT_CACHE if a.data is None else None)
    return report_run(a.generator, data, a.scale, a.experiment, cache_dir=cache, modalities=a.modality)


def cmd_synthesize(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.synthesis import synthesize_run

    return synthesize_run(a.generator, a.data, a.out, a.modalities, a.experiment, split=a.split,
                          keep_real=a.keep_real, progress=not a.quiet)


def cmd_params(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.networks import build_generator

    model = config.preset(a.scale)["model"]
    generator = build_generator(model)
    generator.bank.add("t1")
    counts = generator.bank.parameter_counts()
    return {**counts, "entry_fraction": round(counts["entry_params"] / counts["base_params"], 4), "scale": a.scale,
            "ngf": model["ngf"], "n_blocks": model["n_blocks"]}


def cmd_bench_layers(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.bench import bench_layers

    return bench_layers(a.scale, steps=a.steps, rounds=a.rounds)


def cmd_fl_simulate(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.fl.jobs import simulate

    result = simulate(a.job, a.workdir, scale=a.scale, rounds=a.rounds, n_clients=a.n_clients, progress=not a.quiet,
                      with_code=a.with_code, clients=a.clients.split(",") if a.clients else None,
                      data_root=str(a.data.resolve()) if a.data else None,
                      cache_dir=str(a.cache_dir.resolve()) if a.cache_dir else None, wire_dtype=a.wire_dtype,
                      pretrained=str(a.pretrained.resolve()) if a.pretrained else None,
                      poll_interval=a.poll_interval, **_lifelong(a))
    result.pop("log")
    return result


def cmd_fl_export_jobs(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.fl.jobs import app

    paths = app().export_jobs(a.out, a.job, with_code=a.with_code, scale=a.scale, rounds=a.rounds)
    return {"jobs": [str(p) for p in paths], "with_code": a.with_code}


def _fl_deploy(run: Any, a: argparse.Namespace) -> dict[str, Any]:
    result = run(a.workdir, a.job, scale=a.scale, rounds=a.rounds, ports=tuple(a.ports) if a.ports else None,
                 timeout=a.timeout, progress=not a.quiet, data_root=str(a.data.resolve()) if a.data else None,
                 cache_dir=str(a.cache_dir.resolve()) if a.cache_dir else None,
                 pretrained=str(a.pretrained.resolve()) if a.pretrained else None, with_code=a.with_code,
                 poll_interval=a.poll_interval, **_lifelong(a))
    return {k: result[k] for k in ("checkpoint", "ledgers", "rounds", "sites", "seconds", "seconds_per_iteration",
                                   "job_id")}


def cmd_fl_poc(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.fl.deploy import run_poc

    return _fl_deploy(run_poc, a)


def cmd_fl_provision(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.fl.deploy import run_provisioned

    return _fl_deploy(run_provisioned, a)


def cmd_bench_fl(a: argparse.Namespace) -> dict[str, Any]:
    if a.sites:
        from modalitybank.bench_sites import bench_fl_sites

        return bench_fl_sites(a.sites, a.scale, iterations=a.iterations, workdir=a.workdir, figure=a.figure,
                              progress=not a.quiet, poll_interval=a.poll_interval)
    from modalitybank.bench import bench_fl

    return bench_fl(a.scale, iterations=a.iterations, workdir=a.workdir, wire_dtype=a.wire_dtype,
                    experiment=a.experiment, progress=not a.quiet, poll_interval=a.poll_interval, compile=a.compile)


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    """The README's main job: phantom → pre-train → bank (NVFlare simulator, 3 hospital sites, or one
    process with ``--local``) → figures → synthetic test cases and completed training cases."""
    from modalitybank.data.phantom import make_phantom
    from modalitybank.fl.jobs import simulate
    from modalitybank.report import report_run

    work = Path(a.workdir).resolve()
    t0 = time.perf_counter()
    data, cache = work / "data", work / "cache"
    common = {"scale": a.scale, "cache_dir": cache, "quiet": a.quiet, "seed": a.seed, "iterations": None}
    say = lambda step, text: print(f"[{step}/5] {text}", file=sys.stderr)  # noqa: E731
    say(1, f"BraTS-like phantom ({a.scale}) -> {data}")
    make_phantom(data, scale=a.scale, seed=a.seed, progress=not a.quiet)
    say(2, "pre-training the generator on the LGG-like T1c source set")
    cmd_pretrain(argparse.Namespace(run_dir=work / "pretrain", data=data, **common))
    if a.local:
        say(3, f"learning the bank entries ({a.experiment}) against per-site discriminators, in one process")
        bank = work / "bank"
        cmd_train_local(argparse.Namespace(run_dir=bank, data=data, pretrained=work / "pretrain",
                                           experiment=a.experiment, baseline=None, **common))
    else:
        say(3, f"learning the bank entries ({a.experiment}) on NVFlare: 3 hospital sites in the simulator")
        fl = simulate(f"modalitybank_{a.experiment}", work / "federated", scale=a.scale, progress=not a.quiet,
                      data_root=str(data), cache_dir=str(cache), pretrained=str(work / "pretrain"))
        bank = Path(fl["checkpoint"])
    say(4, "held-out image quality, Fig. 3-style grid, loss curves")
    report = report_run(bank, data, a.scale, a.experiment, cache_dir=cache)
    say(5, "synthesizing complete cases for the test masks and completing the sites' missing modalities")
    common_syn = {"generator": bank, "data": data, "modalities": None, "quiet": a.quiet}
    synth = cmd_synthesize(argparse.Namespace(out=work / "synthetic", split="test", keep_real=False,
                                              experiment=None, **common_syn))
    completed = cmd_synthesize(argparse.Namespace(out=work / "completed", split="train", keep_real=True,
                                                  experiment=a.experiment, **common_syn))
    return {"generator": str(bank), "figure": report["figure"], "loss_curves": report["loss_curves"],
            "quality": report["quality"], "synthetic": synth["datalist"], "completed": completed["datalist"],
            "completed_modalities": completed["synthetic"], "seconds": round(time.perf_counter() - t0, 1)}


# -- parser -----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, data: bool = True, run_dir: bool = True) -> None:
    p.add_argument("--scale", default="tiny", choices=config.scales(), help="size preset (configs/presets.json)")
    if data:
        p.add_argument("--data", type=Path, required=True, help="BraTS-layout folder (the phantom or real BraTS 2018)")
        p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="slice cache (default: %(default)s)")
    if run_dir:
        p.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, logs and figures go; "
                       "an unfinished run there is resumed")
        p.add_argument("--iterations", type=int, default=None, help="override the preset's iteration count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _poll_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll-interval", type=float, default=None, metavar="S",
                   help="seconds an idle site waits before asking the server for work again (default: the job's, "
                        "0.1; shorter makes the sites' requests compete with the server for the CPU)")


def _lifelong_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a federation that grows: a bank continued with new entries, the sites' own settings."""
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a finished generator (checkpoint folder) whose bank gets new entries; the others stay frozen")
    p.add_argument("--add-modality", action="append", default=None, help="a new bank entry to learn (repeatable)")
    p.add_argument("--keep-learning", action="store_true",
                   help="with --resume-from: the existing entries of the job's modalities learn on too")
    p.add_argument("--site-config", type=Path, default=None,
                   help="the sites' own settings (modalitybank_site.json, e.g. from `modalitybank data split`), "
                   "put where each site reads them (its local/ folder)")


def _lifelong(a: argparse.Namespace) -> dict[str, Any]:
    return {"resume_from": str(a.resume_from.resolve()) if a.resume_from else None,
            "add_modalities": ",".join(a.add_modality) if a.add_modality else None,
            "keep_learning": a.keep_learning or None, "site_config": a.site_config}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modalitybank", description=__doc__.splitlines()[0] + " ModalityBank: "
                                     "a central mask-to-image generator with one mAdaFM bank entry per modality.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("phantom", help="write the BraTS-like phantom (real MNI152 anatomy, synthetic tumours, "
                        "3 centres with their scanner styles, an LGG-like T1c source set) in the BraTS 2018 layout")
    p.add_argument("--out", type=Path, required=True, help="output root (HGG/, LGG/, splits.json, dataset.json)")
    _common(p, data=False, run_dir=False)
    p.set_defaults(fn=cmd_phantom)
    p = data.add_parser("source", help="write a pre-training source set of the Table III ablation in its own "
                        "folder: hgg (HGG-like T1c cases, disjoint from the phantom's) or nonbrain (a cardiac "
                        "short-axis cine stand-in, BraTS layout)")
    p.add_argument("--kind", required=True, choices=["hgg", "nonbrain"])
    p.add_argument("--out", type=Path, required=True, help="output folder (HGG/ or CINE/, dataset.json)")
    p.add_argument("--cases", type=int, default=None, help="override the preset's case count")
    _common(p, data=False, run_dir=False)
    p.set_defaults(fn=cmd_source)
    p = data.add_parser("split", help="deal a BraTS-layout folder's cases to N hospital sites (one folder each, "
                        "links only) and write the sites' modalitybank_site.json")
    p.add_argument("--data", type=Path, required=True, help="BraTS-layout folder")
    p.add_argument("--out", type=Path, required=True, help="where the site folders go")
    p.add_argument("--sites", type=int, default=3, help="number of sites (named site-1..N)")
    p.add_argument("--names", default=None, help="comma-separated site names instead (e.g. hospital-north,...)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"])
    p.add_argument("--grades", nargs="+", default=["HGG", "LGG"], help="grade folders to deal (the phantom: HGG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_split)

    p = sub.add_parser("pretrain", help="pre-train the whole generator centrally on a source set (default: LGG, T1c)")
    _common(p)
    p.add_argument("--source", default="lgg", choices=config.pretrain_sources(),
                   help="source set (Table III): lgg reads --data's LGG/; hgg / nonbrain read the set made by "
                   "`modalitybank data source` at --data, or, given a phantom root, <data>/sources/<name> (made "
                   "on demand), or make it at an empty --data")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("train-local", help="learn one bank entry per target modality against per-site "
                       "discriminators in one process (the reference for the federated run)")
    _common(p)
    p.add_argument("--pretrained", type=Path, help="run dir of `modalitybank pretrain`")
    p.add_argument("--experiment", default="multimodal", choices=config.experiments())
    p.add_argument("--baseline", choices=["asyndgan"], default=None,
                   help="train the AsynDGAN baseline (one multi-channel generator, no bank) instead")
    p.set_defaults(fn=cmd_train_local)

    p = sub.add_parser("report", help="held-out image quality (L1 / PSNR / SSIM) of every modality a generator makes "
                       "(an entry added later included), its Fig. 2/3 grid and loss curves, into its folder")
    p.add_argument("generator", type=Path, help="generator folder (a run's checkpoint, with generator.json)")
    p.add_argument("--data", type=Path, default=None, help="BraTS-layout folder with the test cases (default: the "
                   "phantom of --scale)")
    p.add_argument("--scale", default="tiny", choices=config.scales())
    p.add_argument("--experiment", default="multimodal", choices=config.experiments(),
                   help="which modalities each site of the figure holds")
    p.add_argument("--modality", action="append", default=None, help="evaluate only these (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("synthesize", help="masks -> complete multi-modality cases (NIfTI, BraTS layout) + datalist")
    p.add_argument("--generator", type=Path, required=True, help="run dir holding generator.json")
    p.add_argument("--data", type=Path, required=True, help="BraTS-layout folder whose masks are used")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--modalities", nargs="+", choices=config.MODALITIES, help="default: all the generator has")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--keep-real", action="store_true", help="copy the real modalities a site holds and generate "
                   "only the missing ones (modality completion)")
    p.add_argument("--experiment", choices=config.experiments(), help="with --keep-real: which modalities each "
                   "site holds (default: the files present)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_synthesize)

    p = sub.add_parser("params", help="parameter counts: frozen base and one bank entry of the default generator")
    p.add_argument("--scale", default="small", choices=config.scales())
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("layers", help="mAdaFM generator vs the same generator with plain convolutions, "
                         "training and (folded) inference, side by side")
    p.add_argument("--scale", default="small", choices=config.scales())
    p.add_argument("--steps", type=int, default=5, help="calls per round")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds (the median is reported)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench_layers)
    p = bench.add_parser("fl", help="federated iteration (NVFlare simulator, 3 sites) vs the single-process "
                         "reference on the same data and networks; bytes per iteration and site vs the minimum")
    p.add_argument("--scale", default="small", choices=config.scales())
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--experiment", default="multimodal", choices=config.experiments())
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--workdir", default=None, help="where the simulator runs (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sites", type=int, nargs="+", default=None,
                   help="site counts to compare (e.g. 3 6 12): seconds per iteration against the number of sites")
    p.add_argument("--figure", type=Path, default=None, help="with --sites: where the PNG curve goes")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="the generator's norms compiled or eager: never, always or auto (modalitybank.norm.COMPILE_MODES; "
                   "default: as the pre-trained base was saved)")
    _poll_argument(p)
    p.set_defaults(fn=cmd_bench_fl)

    fl = sub.add_parser("fl", help="federated runs on NVFlare").add_subparsers(dest="fl_command", required=True)
    p = fl.add_parser("simulate", help="run a job of jobs/ in the NVFlare simulator (3 hospital sites); "
                      "a second run in the same --workdir resumes from its checkpoint")
    p.add_argument("job", help="job name in jobs/ (modalitybank_multimodal, modalitybank_missing_modality, asyndgan, "
                   "fedavg_segmentation, fedavg_segmentation_missing_modality) or a job folder")
    p.add_argument("--scale", default="tiny", choices=config.scales())
    p.add_argument("--rounds", type=int, default=None, help="iterations (GAN jobs) or rounds (FedAvg); default: preset")
    p.add_argument("--workdir", type=Path, required=True, help="job copy, simulator workspace, checkpoint, log")
    p.add_argument("--data", type=Path, default=None, help="BraTS-layout folder of the sites (default: the phantom)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--pretrained", type=Path, default=None, help="pre-trained generator folder (default: built once)")
    p.add_argument("--n-clients", type=int, default=3)
    p.add_argument("--clients", default=None, help="comma-separated site names (instead of site-1..N)")
    _lifelong_arguments(p)
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default=None)
    p.add_argument("--with-code", action="store_true", help="carry the package's runtime in the job's custom/ "
                   "(the way for sites without the package)")
    _poll_argument(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_fl_simulate)
    p = fl.add_parser("export-jobs", help="write the app's job folders (flare_app/job.py), as jobs/ holds them")
    p.add_argument("out", type=Path, help="folder to write the jobs into")
    p.add_argument("--job", action="append", default=None, help="job name (repeatable; default: all)")
    p.add_argument("--with-code", action="store_true", help="carry the package's runtime in custom/")
    p.add_argument("--scale", default=None, choices=config.scales())
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_fl_export_jobs)
    for name, fn, text in (
            ("poc", cmd_fl_poc, "a POC federation on localhost (server, hospital-a/b/c, admin; nvflare poc): "
             "prepare, start, submit the job, wait, download the result, stop"),
            ("provision", cmd_fl_provision, "provision jobs/project/provision.yml (mutual TLS), start every kit on "
             "localhost, submit the job with the admin kit, wait, download, shut down")):
        p = fl.add_parser(name, help=text)
        p.add_argument("--workdir", type=Path, required=True, help="project file, kits, job copy, result, logs")
        p.add_argument("--job", default="modalitybank_multimodal", help="job name in jobs/ or a job folder")
        p.add_argument("--scale", default=None, choices=config.scales(), help="default: the job's own")
        p.add_argument("--rounds", type=int, default=None, help="iterations (GAN jobs) or rounds (FedAvg)")
        p.add_argument("--data", type=Path, default=None, help="BraTS-layout folder of the sites (default: the phantom)")
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("--pretrained", type=Path, default=None, help="pre-trained generator folder (default: built once)")
        p.add_argument("--ports", type=int, nargs=2, metavar=("FED", "ADMIN"), default=None,
                       help="server ports on 127.0.0.1 (default: the project file's, or free ones if taken)")
        p.add_argument("--timeout", type=float, default=1800.0, help="seconds the job may take")
        p.add_argument("--with-code", action="store_true", help="submit the job carrying its code (sites allow BYOC); "
                       "default: configuration only, the sites' allow-list admits the installed package")
        _lifelong_arguments(p)
        _poll_argument(p)
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)

    p = sub.add_parser("privacy-audit", help="the honest-but-curious server on what it receives, per privacy mode "
                       "(standard, adversarial, dp at each ε): reconstruction, memorisation, membership inference, "
                       "held-out quality")
    p.add_argument("--scale", default="tiny", choices=["tiny", "small"])
    p.add_argument("--out", type=Path, default=Path("runs/privacy_audit"), help="audit.json and reconstructions.png")
    p.add_argument("--iterations", type=int, default=None, help="steps per mode (default: the preset's)")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.1, help="per-example clipping norm C of the dp runs")
    p.add_argument("--modality", default="flair", choices=list(config.MODALITIES))
    p.add_argument("--data", type=Path, default=None, help="BraTS-layout folder (default: the embedded phantom)")
    p.add_argument("--pretrained", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_privacy_audit)

    p = sub.add_parser("demo", help="the main job: phantom -> pre-train -> bank on NVFlare (3 sites) -> figures, "
                       "synthetic and completed cases")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--scale", default="tiny", choices=config.scales())
    p.add_argument("--experiment", default="missing_modality", choices=config.experiments())
    p.add_argument("--local", action="store_true", help="learn the bank in one process instead of on NVFlare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("benchmark", help="the paper's Tables I-III: bank (and AsynDGAN) on NVFlare, synthesis, one "
                       "segmentation network per row through the tumor_segmentation bundle (FedAvg-All inside "
                       "NVFlare), all evaluated on the same held-out real test cases")
    p.add_argument("--table", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--scale", default="small", choices=config.scales(), help="size preset (default: %(default)s)")
    p.add_argument("--data", type=Path, default=None, help="BraTS-layout folder (default: the phantom, made in the "
                   "workdir)")
    p.add_argument("--test-data", type=Path, default=None, help="BraTS-layout folder whose cases all form the test "
                   "set (default: the held-out test split of --data)")
    p.add_argument("--seeds", type=int, default=1, help="repeat GAN and segmentation training with N seeds")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME", help="only these rows of the table")
    p.add_argument("--gan-iterations", type=int, default=None, help="override the preset's pre-training and bank "
                   "iterations (a quick look; recorded in the workdir's settings)")
    p.add_argument("--bank-iterations", type=int, default=None, help="the federated GANs' iterations (bank, "
                   "AsynDGAN) for this run's synthetic rows, in stages of their own (gan/...-it<N>, files "
                   "table<N>-it<N>...; pre-training keeps the preset's); a longer GAN continues the longest "
                   "shorter one of the same recipe in the workdir")
    p.add_argument("--workdir", type=Path, default=None, help="stages are computed once here and reused; an "
                   "interrupted run resumes (default: runs/benchmark-<scale>); one workdir, one set of settings "
                   "(preset, budget, bundle versions, data), recorded in its settings.json")
    p.add_argument("--adopt-workdir", action="store_true", help="record this run's settings for a workdir made "
                   "before settings were recorded, or after removing the stages that depend on a changed setting "
                   "(only if every stage left was computed with these settings or does not depend on the change)")
    p.add_argument("--privacy", default="standard", choices=["standard", "adversarial", "dp"],
                   help="every site's privacy mode while the GANs learn: the synthetic rows show what it costs "
                   "downstream (files table<N>-<mode>...)")
    p.add_argument("--epsilon", type=float, default=None, help="with --privacy dp: each site's ε over the GAN's "
                   "iterations (δ 1e-5)")
    p.add_argument("--clip", type=float, default=None, help="with --privacy dp: per-example clipping norm C "
                   "(default: the site default of modalitybank.dp)")
    p.add_argument("--quiet", action="store_true", help="no per-stage progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(fn=cmd_benchmark)
    return parser


def cmd_privacy_audit(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.privacy_audit import audit, format_table

    result = audit(a.scale, a.out, iterations=a.iterations, epsilons=tuple(a.epsilons), delta=a.delta, clip=a.clip,
                   modality=a.modality, seed=a.seed, data_root=a.data, pretrained=a.pretrained,
                   cache_dir=a.cache_dir, progress=not a.quiet)
    print(format_table(result))
    print(f"figure: {result['figure']}; {result['iterations']} iterations per mode, {result['seconds']} s")
    return result if a.json else {"audit": str(Path(a.out) / "audit.json")}


def cmd_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    from modalitybank.benchmark import run_benchmark

    workdir = a.workdir or Path("runs") / f"benchmark-{a.scale}"
    privacy = None
    if a.privacy != "standard":
        privacy = {"mode": a.privacy, **({"epsilon": a.epsilon} if a.epsilon is not None else {}),
                   **({"clip": a.clip} if a.clip is not None else {})}
        if a.privacy == "dp" and a.epsilon is None:
            raise ValueError("--privacy dp needs --epsilon (the budget every site spends over the GAN's iterations)")
    result = run_benchmark(a.table, a.scale, workdir, data=a.data, test_data=a.test_data, seeds=a.seeds,
                           rows=a.rows, progress=not a.quiet, gan_iterations=a.gan_iterations,
                           bank_iterations=a.bank_iterations, privacy=privacy,
                           adopt_workdir=a.adopt_workdir)
    print(Path(result["files"]["table"]).read_text(), file=sys.stderr if a.json else sys.stdout)
    if a.json:
        return {"table": result["table"], "seconds": result["seconds"],
                "rows": {name: {k: row[k] for k in ("dice", "dice_std", "sens", "spec", "hd95")}
                         for name, row in result["rows"].items()}}
    return {"files": result["files"]["json"], "seconds": result["seconds"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"modalitybank: error: {err}", file=sys.stderr)
        return 2
    _emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
