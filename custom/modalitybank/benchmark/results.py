"""A finished table: ``table<N>.md`` (the paper's format, ours beside the paper's), ``table<N>.csv``,
per-case metrics, stage times, and the pictures (Dice per row with spread, one test case
segmented by every row)."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modalitybank.benchmark.plan import Table  # noqa: E402
from modalitybank.benchmark.segment import METRICS, summarise  # noqa: E402

__all__ = ["row_summary", "separated_pairs", "write_results"]

COLUMNS = tuple(METRICS)  # dice, sens, spec, hd95


def row_summary(seed_results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row over its seeds: means over cases (pooled over seeds), the spread over cases, and
    with several seeds the spread of the per-seed means (``<metric>_seed_std``)."""
    pooled = summarise({f"{i}/{case}": m for i, r in enumerate(seed_results) for case, m in r["per_case"].items()})
    per_seed = [summarise(r["per_case"])["mean"] for r in seed_results]
    out: dict[str, Any] = {}
    for k in COLUMNS:
        out[k], out[f"{k}_std"] = pooled["mean"][k], pooled["std"][k]
        out[f"{k}_seed_std"] = float(np.nanstd([m[k] for m in per_seed])) if len(seed_results) > 1 else 0.0
    out["seeds"] = len(seed_results)
    out["cases"] = len(seed_results[0]["per_case"])
    return out


def separated_pairs(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    """Pairs of rows whose mean Dice differs by more than the seed spread of both (2 × the larger
    per-seed standard deviation): ``(better, worse, difference)``."""
    out = []
    for a, b in itertools.combinations(summary, 2):
        sa, sb = summary[a], summary[b]
        diff = sa["dice"] - sb["dice"]
        if abs(diff) > 2 * max(sa["dice_seed_std"], sb["dice_seed_std"]) and sa["seeds"] > 1:
            out.append((a, b, diff) if diff > 0 else (b, a, -diff))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _time_text(stage_times: Mapping[str, Mapping[str, Any]], seconds: float) -> str:
    """This run's wall time and what all the table's stages took, those reused from earlier runs included."""
    total = sum(t["seconds"] for t in stage_times.values())
    reused = sum(t["seconds"] for t in stage_times.values() if t.get("reused"))
    text = f"Time: all stages {total / 60:.1f} min"
    if reused:
        text += f" ({reused / 60:.1f} min of them computed by earlier runs in this workdir; this run {seconds / 60:.1f} min)"
    return text + "."


def _markdown(table: Table, summary: Mapping[str, Mapping[str, Any]], scale: str,
              stage_times: Mapping[str, Mapping[str, Any]], seconds: float) -> str:
    seeds = next(iter(summary.values()))["seeds"]
    lines = [f"## {table.title}", "",
             f"Ours: scale `{scale}`, {next(iter(summary.values()))['cases']} held-out real test cases, "
             f"{seeds} seed(s), whole tumour; Dice/Sens/Spec in %, mean ± std over cases"
             + (" (± seed spread in brackets)" if seeds > 1 else "") + "; HD95 in mm. "
             f"Paper: BraTS 2018, 40 test cases. {_time_text(stage_times, seconds)}", "",
             "| Method | Dice (%) ↑ | Sens (%) ↑ | Spec (%) ↑ | HD95 (mm) ↓ | paper Dice | paper HD95 |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        spread = f" [±{_pct(s['dice_seed_std'])}]" if seeds > 1 else ""
        paper = table.paper.get(name)
        lines.append(f"| {name} | {_pct(s['dice'])} ± {_pct(s['dice_std'])}{spread} | {_pct(s['sens'])} ± "
                     f"{_pct(s['sens_std'])} | {_pct(s['spec'])} ± {_pct(s['spec_std'])} | {s['hd95']:.2f} ± "
                     f"{s['hd95_std']:.2f} | {f'{paper[0]} ± {paper[1]}' if paper else '–'} | "
                     f"{paper[4] if paper else '–'} |")
    pairs = separated_pairs(summary)
    if seeds > 1:
        lines += ["", "Row differences larger than twice the seed spread: "
                  + ("; ".join(f"{a} > {b} by {100 * d:.1f}" for a, b, d in pairs) or "none")]
    return "\n".join(lines) + "\n"


def _dice_figure(table: Table, results: Mapping[str, list[dict[str, Any]]], path: Path) -> Path:
    names = list(results)
    data = [[c["dice"] for r in results[n] for c in r["per_case"].values()] for n in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    ax.boxplot(data, showmeans=True)
    for i, values in enumerate(data, start=1):
        ax.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=12, alpha=0.6)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("whole-tumour Dice per test case")
    ax.set_ylim(0, 1)
    ax.set_title(table.title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _examples_figure(table: Table, work: Path, seg_dirs: Mapping[str, Path], results: Mapping[str, list[dict]],
                     channel: int, modality: str, path: Path) -> Path:
    names = [n for n in seg_dirs if (seg_dirs[n] / "example.npz").is_file()]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.6))
    first = np.load(seg_dirs[names[0]] / "example.npz")
    image = first["image"][channel].T[::-1]
    axes[0].imshow(image, cmap="gray")
    axes[0].contour(first["label"].T[::-1], levels=[0.5], colors="lime", linewidths=0.8)
    axes[0].set_title(f"{modality.upper()} + truth", fontsize=8)
    for ax, name in zip(axes[1:], names, strict=True):
        ex = np.load(seg_dirs[name] / "example.npz")
        ax.imshow(image, cmap="gray")
        ax.contour(ex["label"].T[::-1], levels=[0.5], colors="lime", linewidths=0.6)
        if ex["pred"].any():
            ax.contour(ex["pred"].T[::-1], levels=[0.5], colors="red", linewidths=0.8)
        case = results[name][0]["example_case"]
        ax.set_title(f"{name}\nDice {results[name][0]['per_case'][case]['dice']:.2f}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"test case {results[names[0]][0]['example_case']}: truth (green), prediction (red)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(table: Table, work: Path, results: Mapping[str, list[dict[str, Any]]],
                  seg_dirs: Mapping[str, Path], gans: Mapping[str, dict[str, Any]], stage_times: Mapping[str, Any],
                  seconds: float, scale: str, example_modality: int, stem: str | None = None,
                  privacy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the table's files into ``work`` (named ``<stem>.md`` etc., default ``table<N>``); ``seg_dirs``: each
    row's segmentation stage folder of the first seed (its example prediction). Returns the JSON summary."""
    n = table.number
    stem = stem or f"table{n}"
    summary = {name: row_summary(seed_results) for name, seed_results in results.items()}
    markdown = _markdown(table, summary, scale, stage_times, seconds)
    if privacy and privacy.get("mode", "standard") != "standard":
        markdown += (f"\nThe sites' privacy settings while the GANs learned: {dict(privacy)} (real and FedAvg rows: "
                     "no GAN, as in the standard table).\n")
    (work / f"{stem}.md").write_text(markdown)
    with open(work / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *[c for k in COLUMNS for c in (k, f"{k}_std", f"{k}_seed_std")], "seeds", "cases"])
        for name, s in summary.items():
            w.writerow([name, *[f"{s[c]:.4f}" for k in COLUMNS for c in (k, f"{k}_std", f"{k}_seed_std")],
                        s["seeds"], s["cases"]])
    with open(work / f"{stem}_cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "case", *COLUMNS])
        for name, seed_results in results.items():
            for seed, r in enumerate(seed_results):
                for case, m in r["per_case"].items():
                    w.writerow([name, seed, case, *[f"{m[k]:.4f}" for k in COLUMNS]])
    figures = {"dice": str(_dice_figure(table, results, work / f"{stem}_dice.png")),
               "examples": str(_examples_figure(table, work, seg_dirs, results, example_modality,
                                                table.modalities[example_modality], work / f"{stem}_examples.png")),
               "generators": {name: g.get("figure") for name, g in gans.items()}}
    out = {"table": n, "scale": scale, "privacy": dict(privacy) if privacy else {"mode": "standard"},
           "rows": {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
                    for name, s in summary.items()},
           "separated": [list(p) for p in separated_pairs(summary)],
           "generators": {name: {"quality": g.get("quality"), "accepted_iterations": g.get("accepted_iterations"),
                                 "sites": g.get("sites"), "continued_from": g.get("continued_from")}
                          for name, g in gans.items()},
           "stages": dict(stage_times), "figures": figures, "seconds": round(seconds, 1),
           "files": {"table": str(work / f"{stem}.md"), "json": str(work / f"{stem}.json")}}
    (work / f"{stem}.json").write_text(json.dumps(out, indent=2))
    return out
