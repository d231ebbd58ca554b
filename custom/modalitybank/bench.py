"""Benchmarks that print figures. Ratios are measured side by side in one run (alternating
rounds, median of rounds), since a shared machine is noisy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from modalitybank import config
from modalitybank.networks import MASK_CHANNELS, ResnetGenerator

__all__ = ["bench_layers", "side_by_side"]


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
    """
    p = config.preset(scale)
    model, size, batch = p["model"], p["slices"]["image_size"], p["train"]["batch_size"]
    torch.manual_seed(seed)
    kwargs = {"ngf": model["ngf"], "n_blocks": model["n_blocks"], "n_downsampling": model["n_downsampling"]}
    madafm = ResnetGenerator(modulated=True, **kwargs)
    madafm.bank.add("flair")
    madafm.bank.freeze_base()
    madafm.bank.use("flair")
    plain = ResnetGenerator(modulated=False, **kwargs)
    x = torch.rand(batch, MASK_CHANNELS, size, size)
    target = torch.rand(batch, 1, size, size) * 2 - 1
    opt_madafm = torch.optim.Adam(madafm.bank.entry_parameters("flair"), lr=2e-4)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=2e-4)

    def train(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            (net(x) - target).abs().mean().backward()
            opt.step()
        return step

    train_times = side_by_side({"madafm": train(madafm, opt_madafm), "plain": train(plain, opt_plain)}, steps, rounds)
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
        "train_seconds_madafm": round(train_times["madafm"], 5),
        "train_seconds_plain": round(train_times["plain"], 5),
        "infer_seconds_madafm": round(infer_times["madafm"], 5),
        "infer_seconds_plain": round(infer_times["plain"], 5),
        "scale": scale, "batch_size": batch, "image_size": size, "threads": torch.get_num_threads(),
    }
