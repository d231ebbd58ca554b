"""Benchmarks that print figures. Ratios are measured side by side in one run (alternating
rounds, median of rounds), since a shared machine is noisy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from modalitybank import config
from modalitybank.networks import MASK_CHANNELS, ResnetGenerator, effective_precision
from modalitybank.norm import compiled_norm_enabled

__all__ = ["bench_fl", "bench_layers", "side_by_side"]


def side_by_side(fns: dict[str, Callable[[], Any]], steps: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, run in alternating rounds of ``steps`` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_layers(scale: str = "small", steps: int = 5, rounds: int = 7, seed: int = 0) -> dict[str, float]:
    """Training and inference time of the mAdaFM generator against the same generator with plain
    convolutions, on one batch of the preset's size.

    Training: forward + backward + Adam step, the mAdaFM generator learning one bank entry
    (frozen base), the plain one learning all its weights (as in pre-training). Inference: the
    mAdaFM generator with its entry folded into plain convolutions, against the plain generator.
    ``norm_train_ratio``: the mAdaFM training step with the preset's norm against the same step with
    whole-slice instance norm (the cost of taking the statistics inside the brain).
    ``precision_train_ratio``: the mAdaFM training step in the preset's precision against the same step
    in float32 (1.0 where it runs float32: a float32 preset, or ``"auto"`` on a CPU without bfloat16
    instructions; ``precision_effective`` says which).
    """
    p = config.preset(scale)
    model, size, batch = p["model"], p["slices"]["image_size"], p["train"]["batch_size"]
    torch.manual_seed(seed)
    precision = model.get("precision", "float32")
    compiled = compiled_norm_enabled(model.get("compile", "never"), "cpu")
    kwargs = {"ngf": model["ngf"], "n_blocks": model["n_blocks"], "n_downsampling": model["n_downsampling"],
              "norm": model["norm"], "precision": precision, "compile": model.get("compile", "never")}
    madafm = ResnetGenerator(modulated=True, **kwargs)
    unmasked = ResnetGenerator(modulated=True, **{**kwargs, "norm": "instance"})
    full = ResnetGenerator(modulated=True, **{**kwargs, "precision": "float32"})
    eager = ResnetGenerator(modulated=True, **{**kwargs, "compile": "never"})
    for net in (madafm, unmasked, full, eager):
        net.bank.add("flair")
        net.bank.freeze_base()
        net.bank.use("flair")
    plain = ResnetGenerator(modulated=False, **kwargs)
    x = torch.rand(batch, MASK_CHANNELS, size, size)
    target = torch.rand(batch, 1, size, size) * 2 - 1
    opt_madafm = torch.optim.Adam(madafm.bank.entry_parameters("flair"), lr=2e-4)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=2e-4)
    opt_unmasked = torch.optim.Adam(unmasked.bank.entry_parameters("flair"), lr=2e-4)
    opt_full = torch.optim.Adam(full.bank.entry_parameters("flair"), lr=2e-4)
    opt_eager = torch.optim.Adam(eager.bank.entry_parameters("flair"), lr=2e-4)

    def train(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            (net(x) - target).abs().mean().backward()
            opt.step()
        return step

    fns = {"madafm": train(madafm, opt_madafm), "plain": train(plain, opt_plain),
           "madafm_instance_norm": train(unmasked, opt_unmasked)}
    if effective_precision(precision, "cpu") != "float32":
        fns["madafm_float32"] = train(full, opt_full)
    if compiled:
        fns["madafm_eager_norm"] = train(eager, opt_eager)
    train_times = side_by_side(fns, steps, rounds)
    folded = madafm.bank.fold("flair")
    plain.eval()

    def infer(net: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                net(x)
        return step

    infer_times = side_by_side({"madafm": infer(folded), "plain": infer(plain)}, steps, rounds)
    return {
        "train_ratio": round(train_times["madafm"] / train_times["plain"], 4),
        "infer_ratio": round(infer_times["madafm"] / infer_times["plain"], 4),
        "norm": model["norm"],
        "norm_train_ratio": round(train_times["madafm"] / train_times["madafm_instance_norm"], 4),
        "precision": precision,
        "precision_effective": effective_precision(precision, "cpu"),
        "precision_train_ratio": round(train_times["madafm"] / train_times.get("madafm_float32", train_times["madafm"]), 4),
        "compile": model.get("compile", "never"),
        "compile_effective": compiled,
        "compile_train_ratio": round(train_times["madafm"] / train_times.get("madafm_eager_norm", train_times["madafm"]), 4),
        "train_seconds_madafm": round(train_times["madafm"], 5),
        "train_seconds_plain": round(train_times["plain"], 5),
        "infer_seconds_madafm": round(infer_times["madafm"], 5),
        "infer_seconds_plain": round(infer_times["plain"], 5),
        "scale": scale, "batch_size": batch, "image_size": size, "threads": torch.get_num_threads(),
    }


def reference_iteration(pretrained: Any, targets: Sequence[str], site_modalities: Mapping[str, Sequence[str]],
                        datasets: Mapping[str, Any], scale: str, iterations: int, warmup: int) -> float:
    """Median seconds of one single-process iteration (:func:`~modalitybank.gan.gan_step`): every site's
    discriminators beside the generator, the bank entries ``targets`` learned, batches from ``datasets``."""
    from modalitybank.gan import gan_step
    from modalitybank.store import load_generator
    from modalitybank.training import BatchStream, TrainSettings, make_site_models

    settings = TrainSettings.from_preset(scale, "bank")
    generator = load_generator(pretrained)
    optimizer = settings.adam(generator.bank.learn(list(targets)))
    sites = make_site_models(site_modalities, config.preset(scale)["model"], settings)
    streams = {s: BatchStream(datasets[s], settings.batch_size, i) for i, s in enumerate(site_modalities)}
    times = []
    for _ in range(iterations):
        batches = {s: next(streams[s]) for s in sites}
        start = time.perf_counter()
        gan_step(generator, optimizer, sites, batches, settings.gan_loss())
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def bench_fl(scale: str = "small", iterations: int = 30, warmup: int = 5, workdir: str | None = None,
             wire_dtype: str = "float32", experiment: str = "multimodal", progress: bool = True,
             poll_interval: float | None = None, compile: str | None = None) -> dict[str, Any]:
    """The federated iteration (NVFlare simulator, 3 sites) against the single-process reference
    iteration, on the same data, networks and batch size, run one after the other in this command.
    ``poll_interval``: the job's (``None``: its default). ``compile``: the generator's norms compiled or
    not (:data:`~modalitybank.norm.COMPILE_MODES`; ``None``: as the pre-trained base was saved).

    Also the bytes that cross per iteration and site, as NVFlare serialises the messages, against
    the minimum: the raw masks, fakes and gradients.
    """
    import json
    import tempfile
    from pathlib import Path

    import numpy as np

    from modalitybank.data.brats import site_datasets
    from modalitybank.data.default import CACHE_ROOT, default_phantom, default_pretrained
    from modalitybank.fl.jobs import simulate
    from modalitybank.store import read_info, with_run_settings
    from modalitybank.training import TrainSettings

    job = {"multimodal": "modalitybank_multimodal", "missing_modality": "modalitybank_missing_modality"}[experiment]
    p, exp = config.preset(scale), config.experiment(experiment)
    data = default_phantom(scale)
    cache = CACHE_ROOT / "slices"
    pretrained = default_pretrained(scale, data_root=data, cache_dir=cache)
    workdir = workdir or tempfile.mkdtemp(prefix="modalitybank-bench-fl-")
    if compile is not None:
        pretrained = with_run_settings(pretrained, Path(workdir) / "pretrained", compile=compile)

    settings = TrainSettings.from_preset(scale, "bank", iterations=iterations)
    reference = reference_iteration(pretrained, exp["targets"], exp["sites"],
                                    site_datasets(data, experiment, scale, cache_dir=cache), scale, iterations, warmup)

    # federated: the same in the NVFlare simulator
    result = simulate(job, Path(workdir) / "run", scale=scale, rounds=iterations, progress=progress,
                      data_root=str(data), cache_dir=str(cache), pretrained=str(pretrained),
                      measure_wire_bytes=True, wire_dtype=wire_dtype, poll_interval=poll_interval)
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    federated = statistics.median(m["seconds"] for m in metrics[warmup:])
    server_ledger = next(path for path in result["ledgers"] if "/server/" in path)
    messages: dict[tuple[int, str, str], int] = {}
    for line in Path(server_ledger).read_text().splitlines():
        e = json.loads(line)
        if e["task"] == "modalitybank_gan_step" and e.get("wire_bytes"):
            messages[(e["iteration"], e["site"], e["direction"])] = e["wire_bytes"]
    per_site_iteration: dict[tuple[int, str], int] = {}
    for (it, site, _), n in messages.items():
        per_site_iteration[(it, site)] = per_site_iteration.get((it, site), 0) + n
    size, batch = p["slices"]["image_size"], settings.batch_size
    itemsize = np.dtype(wire_dtype).itemsize
    minimum = {s: batch * size * size * (1 + 2 * itemsize * len(mods)) for s, mods in exp["sites"].items()}
    return {
        "ratio": round(federated / reference, 3),
        "bytes_per_iteration_per_site": int(statistics.mean(per_site_iteration.values())),
        "min_bytes_per_iteration_per_site": int(statistics.mean(minimum.values())),
        "reference_seconds_per_iteration": round(reference, 4),
        "federated_seconds_per_iteration": round(federated, 4),
        "scale": scale, "iterations": iterations, "wire_dtype": wire_dtype, "sites": result["sites"],
        "compile": read_info(pretrained)["architecture"]["compile"],
    }
