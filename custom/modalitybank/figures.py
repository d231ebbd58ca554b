"""Pictures people would rather see than read: the paper's Fig. 2/3 grids and loss curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from modalitybank.networks import ResnetGenerator, mask_channels  # noqa: E402

__all__ = ["loss_curves", "modality_grid", "scaling_curve"]

#: Colours of the mask column: outside brain, brain, necrosis (1), edema (2), enhancing (4).
_MASK_CMAP = ListedColormap(["black", "#4a4a4a", "#d62728", "#2ca02c", "#ffdd00"])


def _mask_image(label: np.ndarray, brain: np.ndarray) -> np.ndarray:
    out = (brain > 0).astype(np.int64)
    out[label == 1], out[label == 2], out[label == 4] = 2, 3, 4
    return out


@torch.no_grad()
def modality_grid(generator: ResnetGenerator, rows: Sequence[Mapping[str, object]], modalities: Sequence[str],
                  path: str | Path, title: str = "") -> Path:
    """A grid like the paper's Fig. 2/3: per row (a) the mask, then the synthetic image of each
    modality, then the real one ("NA" where the site does not have it).

    Args:
        generator: a trained generator (bank or multi-channel).
        rows: dicts with ``label (H, W)``, ``brain (H, W)`` tensors, ``reals``: ``{modality: (H, W)}``
            (only those the site has) and ``name``: the row's caption (site/case).
        modalities: the columns.
        path: PNG to write.
    """
    generator.eval()
    n_cols = 1 + 2 * len(modalities)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.7 * n_cols, 1.8 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        label, brain = row["label"], row["brain"]
        fakes = generator.generate(mask_channels(label[None], brain[None]), modalities)  # type: ignore[index]
        panels = [("mask", _mask_image(np.asarray(label), np.asarray(brain)), _MASK_CMAP, (0, 4))]
        panels += [(f"syn {m}", fakes[m][0, 0].numpy(), "gray", (-1, 1)) for m in modalities]
        reals: Mapping[str, torch.Tensor] = row["reals"]  # type: ignore[assignment]
        panels += [(f"real {m}", reals[m].numpy() if m in reals else None, "gray", (-1, 1)) for m in modalities]
        for c, (head, img, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(head, fontsize=9)
            if img is None:
                ax.imshow(np.zeros_like(panels[0][1]), cmap="gray", vmin=0, vmax=1)
                ax.text(0.5, 0.5, "NA", color="white", ha="center", va="center", fontsize=14, transform=ax.transAxes)
            else:
                ax.imshow(np.rot90(img), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        axes[r, 0].set_ylabel(str(row.get("name", "")), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(metrics_jsonl: str | Path, path: str | Path, title: str = "", smooth: int = 10) -> Path:
    """Discriminator and generator losses per iteration (mean over sites and modalities)."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_jsonl}: no iterations logged")
    it = np.array([r["iteration"] for r in records])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key, head in zip(axes, ("d", "g_adv", "g_l1"), ("D loss", "G adversarial", "G L1"), strict=True):
        y = np.array([r["mean"][key] for r in records])
        ax.plot(it, y, alpha=0.3, color="C0")
        if len(y) >= smooth:
            ax.plot(it[smooth - 1:], np.convolve(y, np.ones(smooth) / smooth, mode="valid"), color="C0")
        ax.set_title(head, fontsize=10)
        ax.set_xlabel("iteration")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def scaling_curve(sites: Sequence[int], federated: Sequence[float], reference: Sequence[float],
                  path: str | Path) -> Path:
    """Seconds per iteration against the number of sites: the NVFlare simulator and the single-process reference."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sites, federated, "o-", label="federated (NVFlare simulator)")
    ax.plot(sites, reference, "s--", label="reference (one process)")
    ax.set_xlabel("sites")
    ax.set_ylabel("seconds per iteration")
    ax.set_xticks(list(sites))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
