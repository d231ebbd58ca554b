"""tools/benchmark_diagnostics.py on a hand-made benchmark workdir: a synthesis stage whose images are the
real ones (every figure synthetic = real), one whose tumour is drawn dimmer and with a blurred edge (the
figures move the way the tool's docstring says they do), the label counts and the slices figure."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_diagnostics.py"
CASE = "Brats18_TCIA01_001_1"


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_diagnostics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/HGG/<case>`` (real T2 and FLAIR: a textured ellipsoid brain with a bright tumour of labels 2
    and 4) and two synthesis stages of it: ``synth/same`` (the real images) and ``synth/dim`` (the tumour
    0.6 as bright above the brain, its edge blurred)."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in (40, 40, 24)), indexing="ij")
    brain = ((x - 20) / 17) ** 2 + ((y - 20) / 15) ** 2 + ((z - 12) / 10) ** 2 <= 1
    seg = np.zeros(brain.shape, np.int16)
    tumour = ((x - 24) ** 2 + (y - 18) ** 2 + (z - 12) ** 2) <= 36
    seg[tumour] = 2
    seg[((x - 24) ** 2 + (y - 18) ** 2 + (z - 12) ** 2) <= 9] = 4
    real_dir, same_dir, dim_dir = (root / p / "HGG" / CASE for p in ("data", "synth/same", "synth/dim"))
    _save(seg, real_dir / f"{CASE}_seg.nii.gz")
    for suffix in ("t2", "flair"):
        healthy = 300 + 40 * rng.standard_normal(brain.shape)
        real = np.where(brain, healthy + 500 * tumour, 0).astype(np.float32)
        dim = np.where(brain, healthy + ndi.gaussian_filter(300 * tumour.astype(np.float32), 1.5), 0).astype(np.float32)
        _save(real, real_dir / f"{CASE}_{suffix}.nii.gz")
        _save(real, same_dir / f"{CASE}_{suffix}.nii.gz")
        _save(dim, dim_dir / f"{CASE}_{suffix}.nii.gz")
    return root


def test_contrast_separation_and_edges_of_real_images_are_the_real_figures(workdir: Path) -> None:
    tool = _load_tool()
    for measure in (tool.contrast, tool.separation, tool.edges):
        result = measure(workdir, "synth/same")
        assert set(result) == {"TCIA"} and set(result["TCIA"]) == {"t2", "flair"}
        for figures in result["TCIA"].values():
            assert figures and all(synthetic == real for synthetic, real in figures.values())


def test_a_dimmer_blurred_tumour_shows_in_contrast_separation_and_edges(workdir: Path) -> None:
    tool = _load_tool()
    contrast = tool.contrast(workdir, "synth/dim")["TCIA"]["flair"]
    assert contrast["edema"][0] < contrast["edema"][1] - 0.5  # synthetic edema less bright than the real
    assert abs(contrast["healthy"][0] - contrast["healthy"][1]) < 0.5
    separation = tool.separation(workdir, "synth/dim")["TCIA"]["flair"]
    assert separation["tumour_p10"][0] < separation["tumour_p10"][1]
    edges = tool.edges(workdir, "synth/dim")["TCIA"]["flair"]
    synthetic_step = edges["inside_1"][0] - edges["outside_1"][0]
    real_step = edges["inside_1"][1] - edges["outside_1"][1]
    assert edges["outside_1"][0] > edges["outside_1"][1]  # the ramp spills outside the edge
    assert synthetic_step < 0.5 * real_step


def test_labels_and_the_slices_figure_from_the_command_line(workdir: Path, tmp_path: Path) -> None:
    labels = _load_tool().labels(workdir / "data")
    seg = np.asarray(nib.load(workdir / "data" / "HGG" / CASE / f"{CASE}_seg.nii.gz").dataobj)
    assert labels == {"HGG": {"cases": 1, "edema": int((seg == 2).sum()), "necrosis": 0,
                              "enhancing": int((seg == 4).sum())}}
    out = tmp_path / "slices.png"
    proc = subprocess.run([sys.executable, str(TOOL), "slices", str(workdir), "synth/dim", CASE, str(out)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == str(out) and out.stat().st_size > 5_000
    missing = subprocess.run([sys.executable, str(TOOL), "slices", str(workdir), "synth/dim", "Brats18_X", str(out)],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no synthetic images of case Brats18_X" in missing.stderr
