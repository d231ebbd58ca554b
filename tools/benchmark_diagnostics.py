"""What limits a synthetic row of the benchmark: measurements on a benchmark workdir.

usage:
  python tools/benchmark_diagnostics.py contrast WORKDIR SYNTH_STAGE
  python tools/benchmark_diagnostics.py separation WORKDIR SYNTH_STAGE
  python tools/benchmark_diagnostics.py edges WORKDIR SYNTH_STAGE
  python tools/benchmark_diagnostics.py false-positives WORKDIR SEG_STAGE CASE
  python tools/benchmark_diagnostics.py components WORKDIR SEG_STAGE
  python tools/benchmark_diagnostics.py labels FOLDER
  python tools/benchmark_diagnostics.py seg-seeds WORKDIR SEG_STAGE SEED [SEED ...]
  python tools/benchmark_diagnostics.py slices WORKDIR SYNTH_STAGE CASE OUT.png

``labels``: the voxels of each tumour label in every grade folder (``HGG``, ``LGG``) of a BraTS-layout
folder: a data set, or a pre-training source of the benchmark's workdir (``sources/hgg``).

``contrast``: for every training case of a synthesis stage (``synth/<name>`` of ``modalitybank
benchmark``), the mean intensity of each label (healthy brain, edema, necrosis, enhancing), z-scored
inside the brain as the segmentation bundle does, in the synthetic image and in the real image of the
same case, averaged per data centre and modality. A generator that renders the labels' contrast shows
the same figures as the real images.

``separation``: for the same cases, the bright tail of the healthy brain, the dark tail of the tumour
and the healthy brain's fine texture, synthetic against real (see :func:`separation`).

``edges``: for the same cases, the mean z in rings of one voxel around the tumour's edge (in the axial
plane): two inside it and two outside, synthetic against real. A real edge is a step; a generator that
draws it as a ramp teaches a segmentation network to put the edge inside the bright region.

``false-positives``: a segmentation row's (``seg/<name>``) prediction on one held-out test case
through the bundle's evaluation preprocessing and inferer: true/false positives (and how many of them
lie within 2 voxels of the tumour) and false negatives, by the slice's brain area (over the case's
largest), and the real z-scored intensities where it was wrong.

``seg-seeds``: how much a row moves with the segmentation network's seed alone: the row's training data
(its ``datalist.json``, or the synthesis stage's for a synthetic row) trained again through the bundle with
the same budget and other seeds, and evaluated on the same test cases (in ``WORKDIR/diagnostics/``); the
stage's own seed is read from its ``trained.json``. The spread the GAN adds on top is not in it.

``slices``: a PNG of one training case, real above synthetic for every modality, at seven axial levels from
the top of the brain to the bottom (the largest tumour slice among them), z-scored inside the brain as the
segmentation bundle sees them, the tumour outlined: what the synthetic healthy brain lacks.

``components``: a segmentation row's prediction on every held-out test case: how many connected
pieces it has, and its Dice with only the largest kept (how much isolated false positives cost).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

#: BraTS label -> name; 0 is the healthy brain.
LABELS = {0: "healthy", 2: "edema", 1: "necrosis", 4: "enhancing"}
FILE_SUFFIX = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}


def _z(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return (volume - volume[brain].mean()) / (volume[brain].std() + 1e-6)


def _centre(case: str) -> str:
    return "CBICA" if "CBICA" in case else "TCIA" if "TCIA" in case else "Other"


def _pairs(workdir: Path, stage: str, case: str = "*") -> Iterator[tuple[str, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(centre, modality, synthetic z, real z, seg, brain)`` for every training case (or the one named
    ``case``) and modality of synthesis stage ``stage``, both images z-scored inside the real image's brain."""
    real_root = workdir / "data"
    for case_dir in sorted((workdir / stage).glob(f"*GG/{case}")):
        case = case_dir.name
        real_dir = next(real_root.glob(f"*GG/{case}"))
        seg = np.asarray(nib.load(real_dir / f"{case}_seg.nii.gz").dataobj)
        for modality, suffix in FILE_SUFFIX.items():
            synthetic_path = case_dir / f"{case}_{suffix}.nii.gz"
            if not synthetic_path.is_file():
                continue
            synthetic = np.asarray(nib.load(synthetic_path).dataobj, dtype=np.float32)
            real = np.asarray(nib.load(real_dir / f"{case}_{suffix}.nii.gz").dataobj, dtype=np.float32)
            brain = real > 0
            yield _centre(case), modality, _z(synthetic, brain), _z(real, brain), seg, brain


def _mean_by_key(values: dict[tuple[str, str, str], list[tuple[float, float]]]) -> dict:
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (centre, modality, name), pairs in sorted(values.items()):
        mean = np.mean(pairs, axis=0)
        out.setdefault(centre, {}).setdefault(modality, {})[name] = [round(float(mean[0]), 2), round(float(mean[1]), 2)]
    return out


def contrast(workdir: Path, stage: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{centre: {modality: {label: [synthetic z, real z]}}}`` over the stage's cases."""
    sums: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for centre, modality, zs, zr, seg, brain in _pairs(workdir, stage):
        for label, name in LABELS.items():
            inside = (seg == label) & brain
            if inside.sum() >= 20:
                sums.setdefault((centre, modality, name), []).append((zs[inside].mean(), zr[inside].mean()))
    return _mean_by_key(sums)


def _separation_figures(z: np.ndarray, far: np.ndarray, tumour: np.ndarray) -> dict[str, float]:
    fine = z - ndi.gaussian_filter(z, 1.5)
    return {"healthy_p999": float(np.percentile(z[far], 99.9)), "tumour_p10": float(np.percentile(z[tumour], 10)),
            "healthy_texture": float(fine[far].std())}


def separation(workdir: Path, stage: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{centre: {modality: {figure: [synthetic, real]}}}``: how far apart healthy brain and tumour lie.

    ``healthy_p999``: the 99.9th percentile of z in healthy brain more than 5 voxels from the tumour
    (its bright tail); ``tumour_p10``: the 10th percentile of z in the tumour (its dark tail);
    ``healthy_texture``: the std of the healthy brain's fine detail (z minus its Gaussian blur, σ 1.5
    voxels). A segmentation network learns a boundary between the first two; where the synthetic gap
    is narrower than the real one, or the synthetic texture smoother, real healthy brain crosses it."""
    values: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for centre, modality, zs, zr, seg, brain in _pairs(workdir, stage):
        far = brain & (ndi.distance_transform_edt(seg == 0) > 5)
        tumour = (seg > 0) & brain
        synthetic, real = _separation_figures(zs, far, tumour), _separation_figures(zr, far, tumour)
        for name in synthetic:
            values.setdefault((centre, modality, name), []).append((synthetic[name], real[name]))
    return _mean_by_key(values)


#: The rings of :func:`edges`, from the tumour's inside out.
RINGS = ("inside_2", "inside_1", "outside_1", "outside_2")


def edges(workdir: Path, stage: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{centre: {modality: {ring: [synthetic, real]}}}``: mean z in the rings :data:`RINGS` of one voxel
    (4-connected in the axial plane) inside and outside the tumour's edge."""
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    values: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for centre, modality, zs, zr, seg, brain in _pairs(workdir, stage):
        tumour = seg > 0
        shrunk = [tumour, ndi.binary_erosion(tumour, plane), ndi.binary_erosion(tumour, plane, iterations=2)]
        grown = [tumour, ndi.binary_dilation(tumour, plane), ndi.binary_dilation(tumour, plane, iterations=2)]
        rings = (shrunk[1] & ~shrunk[2], tumour & ~shrunk[1], grown[1] & ~tumour & brain, grown[2] & ~grown[1] & brain)
        for name, ring in zip(RINGS, rings, strict=True):
            if ring.sum() >= 20:
                values.setdefault((centre, modality, name), []).append((zs[ring].mean(), zr[ring].mean()))
    return _mean_by_key(values)


def _modalities(workdir: Path, stage: str) -> list[str]:
    """The modalities of the table a workdir's stage belongs to (from its ``settings.json``)."""
    experiments = json.loads((workdir / "settings.json").read_text())["experiments"]
    return list(experiments["missing_modality" if "missing_modality" in stage else "multimodal"]["targets"])


def _predictions(workdir: Path, stage: str, case_id: str = "") -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(case, image, tumour, prediction)`` of segmentation row ``stage`` on every held-out test case
    whose name contains ``case_id``, through the bundle's evaluation preprocessing and inferer."""
    import torch
    from monai.bundle import ConfigParser

    from modalitybank.bundle.segmentation import brats_datalist
    from modalitybank.resources import bundle_dir

    mods = _modalities(workdir, stage)
    cases = [c for c in brats_datalist(workdir / "data", mods, sections={"test": "test"})["test"]
             if case_id in str(c["label"])]
    parser = ConfigParser()
    bundle = bundle_dir("tumor_segmentation")
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "modalities": mods, "device": "$torch.device('cpu')"})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(workdir / stage / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    preprocessing, inferer = parser.get_parsed_content("validate#preprocessing"), parser.get_parsed_content("validate#inferer")
    for case in cases:
        item = preprocessing({k: case[k] for k in ("image", "label")})
        with torch.no_grad():
            pred = inferer(item["image"][None].float(), net).argmax(1)[0].numpy() > 0
        yield case.get("case", Path(case["label"]).name), item["image"].numpy(), item["label"][0].numpy() > 0, pred


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return round(float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)), 4)


def components(workdir: Path, stage: str) -> dict[str, dict[str, float]]:
    """Per test case: the prediction's connected components (26-connected, in 3D), the voxels outside
    the largest, and Dice as predicted and with only the largest component kept."""
    out = {}
    for case, _, tumour, pred in _predictions(workdir, stage):
        cc, n = ndi.label(pred, structure=np.ones((3, 3, 3)))
        largest = cc == 1 + int(np.argmax(ndi.sum(pred, cc, range(1, n + 1)))) if n else pred

        out[case] = {"components": n, "outside_largest": int(pred.sum() - largest.sum()),
                     "dice": _dice(pred, tumour), "dice_largest": _dice(largest, tumour)}
    out["mean"] = {k: round(float(np.mean([v[k] for v in out.values()])), 4) for k in ("dice", "dice_largest")}
    return out


def seg_seeds(workdir: Path, stage: str, seeds: list[int]) -> dict[str, object]:
    """Dice (and sensitivity) of segmentation row ``stage`` trained again with each of ``seeds``, its own run beside."""
    from modalitybank.benchmark import segment
    from modalitybank.benchmark.plan import Budget

    trained = json.loads((workdir / stage / "trained.json").read_text())
    settings = json.loads((workdir / "settings.json").read_text())
    mods = _modalities(workdir, stage)
    own = json.loads((workdir / stage / "stage.json").read_text())["result"]
    runs = {int(trained["seed"]): {"dice": round(own["mean"]["dice"], 4), "sens": round(own["mean"]["sens"], 4)}}
    for seed in seeds:
        folder = workdir / "diagnostics" / "seg-seeds" / f"{Path(stage).name}-s{seed}"
        models = segment.train(trained["datalist"], folder, mods, Budget.of(settings["scale"]), seed).parent
        m = segment.evaluate(models, workdir / "data", "test", folder / "eval", mods)
        runs[seed] = {"dice": round(m["mean"]["dice"], 4), "sens": round(m["mean"]["sens"], 4)}
    dice = np.array([r["dice"] for r in runs.values()])
    return {"seeds": runs, "dice_mean": round(float(dice.mean()), 4), "dice_std": round(float(dice.std()), 4)}


def slices(workdir: Path, stage: str, case: str, out: Path) -> Path:
    """The :mod:`slices <benchmark_diagnostics>` figure of training case ``case`` of synthesis ``stage``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real, syn = {}, {}
    for _, m, synthetic_z, real_z, seg, mask in _pairs(workdir, stage, case):
        real[m], syn[m], tumour, brain = real_z, synthetic_z, seg > 0, mask
    if not real:
        raise SystemExit(f"{workdir / stage}: no synthetic images of case {case}")
    mods = list(real)
    area = brain.sum((0, 1)) / brain.sum((0, 1)).max()
    top = int(np.argmax(area))
    below, above = np.flatnonzero(area[:top] > 0), np.flatnonzero(area[top:] > 0) + top
    levels = [int(below[np.argmin(np.abs(area[below] - f))]) for f in (0.1, 0.3)] if len(below) else []
    levels += [int(np.argmax(tumour.sum((0, 1)))), top]
    levels += [int(above[np.argmin(np.abs(area[above] - f))]) for f in (0.5, 0.2, 0.05)]
    fig, axes = plt.subplots(2 * len(mods), len(levels), figsize=(2.2 * len(levels), 4.4 * len(mods)), squeeze=False)
    for j, k in enumerate(levels):
        for i, m in enumerate(mods):
            for r, (name, volumes) in enumerate((("real", real), ("synthetic", syn))):
                ax = axes[2 * i + r][j]
                ax.imshow(volumes[m][:, :, k].T, cmap="gray", vmin=-3, vmax=4, origin="lower")
                if tumour[:, :, k].any():
                    ax.contour(tumour[:, :, k].T, levels=[0.5], colors="r", linewidths=0.5)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{name} {m}")
                if i == 0 and r == 0:
                    ax.set_title(f"slice {k}, brain {area[k]:.2f}", fontsize=8)
    fig.suptitle(f"{case}: {stage}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


def false_positives(workdir: Path, stage: str, case_id: str) -> dict[str, object]:
    """Where row ``stage`` is wrong on test case ``case_id`` (see the module docstring)."""
    _, image, tumour, pred = next(_predictions(workdir, stage, case_id))
    brain = np.abs(image).sum(0) > 0
    area = brain.sum((0, 1)) / brain.sum((0, 1)).max()
    fp, fn = pred & ~tumour, tumour & ~pred
    bins = {}
    for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)):
        zs = (area >= lo) & (area < hi)
        bins[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = {"slices": int(zs.sum()), "fp": int(fp[:, :, zs].sum()),
                                                "fn": int(fn[:, :, zs].sum())}
    z = {m: {"at_fp": round(float(image[i][fp].mean()), 2) if fp.any() else None,
             "tumour": round(float(image[i][tumour].mean()), 2),
             "healthy": round(float(image[i][brain & ~tumour].mean()), 2)} for i, m in enumerate(_modalities(workdir, stage))}
    near = ndi.distance_transform_edt(~tumour) <= 2  # the tumour's rim: a boundary drawn too wide
    edge = ndi.distance_transform_edt(tumour) <= 1  # the tumour's outermost voxels: a boundary drawn too tight
    return {"case": case_id, "tumour": int(tumour.sum()), "tp": int((pred & tumour).sum()), "fp": int(fp.sum()),
            "fp_within_2_voxels": int((fp & near).sum()), "fn": int(fn.sum()),
            "fn_at_the_edge": int((fn & edge).sum()), "by_brain_area": bins, "z": z}


def labels(root: Path) -> dict[str, dict[str, int]]:
    """``{grade: {"cases": n, "<label>": voxels}}`` over the ``*_seg.nii.gz`` of ``root/<grade>/<case>/``."""
    out: dict[str, dict[str, int]] = {}
    for seg_path in sorted(root.glob("*/*/*_seg.nii.gz")):
        grade = out.setdefault(seg_path.parents[1].name, {"cases": 0, **{LABELS[k]: 0 for k in (2, 1, 4)}})
        seg = np.asarray(nib.load(seg_path).dataobj)
        grade["cases"] += 1
        for k in (2, 1, 4):
            grade[LABELS[k]] += int((seg == k).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("contrast")
    c.add_argument("workdir", type=Path)
    c.add_argument("stage", help="a synthesis stage, e.g. synth/bank-missing_modality-lgg-seed0")
    s = sub.add_parser("separation")
    s.add_argument("workdir", type=Path)
    s.add_argument("stage", help="a synthesis stage, e.g. synth/bank-multimodal-lgg-seed0")
    f = sub.add_parser("false-positives")
    f.add_argument("workdir", type=Path)
    f.add_argument("stage", help="a segmentation stage, e.g. seg/synthetic_missing_modality_bank-lgg-seed0")
    f.add_argument("case", help="a held-out test case (a part of its name is enough)")
    k = sub.add_parser("components")
    k.add_argument("workdir", type=Path)
    k.add_argument("stage", help="a segmentation stage, e.g. seg/synthetic_multimodal_bank-lgg-seed0")
    e = sub.add_parser("edges")
    e.add_argument("workdir", type=Path)
    e.add_argument("stage", help="a synthesis stage, e.g. synth/bank-multimodal-lgg-seed0")
    ss = sub.add_parser("seg-seeds")
    ss.add_argument("workdir", type=Path)
    ss.add_argument("stage", help="a segmentation stage of a real or synthetic row, e.g. seg/synthetic_multimodal_bank-lgg-seed0")
    ss.add_argument("seeds", type=int, nargs="+")
    sl = sub.add_parser("slices")
    sl.add_argument("workdir", type=Path)
    sl.add_argument("stage", help="a synthesis stage, e.g. synth/bank-multimodal-lgg-seed0")
    sl.add_argument("case", help="a training case, e.g. Brats18_TCIA03_534_1")
    sl.add_argument("out", type=Path, help="the PNG to write")
    la = sub.add_parser("labels")
    la.add_argument("folder", type=Path)
    a = parser.parse_args()
    if a.what == "labels":
        print(json.dumps(labels(a.folder), indent=1))
    elif a.what in ("contrast", "separation", "edges"):
        result = {"contrast": contrast, "separation": separation, "edges": edges}[a.what](a.workdir, a.stage)
        names = {"contrast": list(LABELS.values()), "edges": list(RINGS),
                 "separation": ["healthy_p999", "tumour_p10", "healthy_texture"]}[a.what]
        print(f"{'centre':6s} {'modality':8s} " + " ".join(f"{n:>17s}" for n in names))
        for centre, mods in result.items():
            for modality, by_name in mods.items():
                cells = [f"{by_name[n][0]:+.2f} / {by_name[n][1]:+.2f}" if n in by_name else "-" for n in names]
                print(f"{centre:6s} {modality:8s} " + " ".join(f"{x:>17s}" for x in cells))
        print("(synthetic / real" + (")" if a.what == "separation" else ": mean z inside the brain)"))
    elif a.what == "components":
        print(json.dumps(components(a.workdir, a.stage), indent=1))
    elif a.what == "slices":
        print(slices(a.workdir, a.stage, a.case, a.out))
    elif a.what == "seg-seeds":
        print(json.dumps(seg_seeds(a.workdir, a.stage, a.seeds), indent=1))
    else:
        result = false_positives(a.workdir, a.stage, a.case)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
