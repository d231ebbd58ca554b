"""The BraTS-like phantom: layout, labels, MRI contrasts, determinism, centre styles, shapes."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from modalitybank.data.phantom import make_phantom, phantom_case

SMALL = {"CBICA": 1, "TCIA": 1, "Other": 1, "test": 1, "LGG": 1}
HGG_SUFFIXES = ("t1", "t1ce", "t2", "flair", "seg")
ID_PATTERNS = {
    "CBICA": r"Brats18_CBICA_[A-Z]{3}_1",
    "TCIA": r"Brats18_TCIA0\d_\d{3}_1",
    "Other": r"Brats18_2013_\d+_1",
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    summary = make_phantom(root, "tiny", seed=0, progress=False, cases=SMALL)
    return root, summary


@pytest.fixture(scope="module")
def centre_cases():
    """One case per centre from the same seed: same anatomy and tumour, different scanners."""
    return {c: phantom_case([5, 0, 0], 2.5, c) for c in ("CBICA", "TCIA", "Other")}


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def test_layout_and_ids(phantom):
    root, summary = phantom
    meta = json.loads((root / "dataset.json").read_text())
    splits = json.loads((root / "splits.json").read_text())
    assert meta == summary and meta["complete"]
    assert meta["name"] == "ModalityBank BraTS-like phantom"
    assert meta["scale"] == "tiny" and meta["seed"] == 0 and meta["spacing_mm"] == 2.5
    assert meta["shape"] == [96, 96, 62]
    assert set(meta["styles"]) >= {"CBICA", "TCIA", "Other"}
    for centre, ids in meta["cases"].items():
        assert len(ids) == 1 and all(re.fullmatch(ID_PATTERNS[centre], i) for i in ids)
    train = [i for ids in meta["cases"].values() for i in ids]
    assert splits == {"train": train, "test": meta["test"]}
    assert len(meta["test"]) == 1 and re.fullmatch(ID_PATTERNS["CBICA"], meta["test"][0])  # round robin
    assert not set(train) & set(meta["test"])
    assert sorted(p.name for p in (root / "HGG").iterdir()) == sorted(train + meta["test"])
    assert sorted(p.name for p in (root / "LGG").iterdir()) == sorted(meta["lgg"])
    for case in train + meta["test"]:
        files = sorted(p.name for p in (root / "HGG" / case).iterdir())
        assert files == sorted(f"{case}_{s}.nii.gz" for s in HGG_SUFFIXES)
    for case in meta["lgg"]:
        assert re.fullmatch(r"Brats18_(2013_\d+|TCIA\d\d_\d{3})_1", case)
        files = sorted(p.name for p in (root / "LGG" / case).iterdir())
        assert files == [f"{case}_seg.nii.gz", f"{case}_t1ce.nii.gz"]
    assert not set(meta["lgg"]) & set(train + meta["test"])


def test_volumes_labels_and_background(phantom):
    root, _ = phantom
    for folder, need, forbid in (("HGG", {1, 2, 4}, set()), ("LGG", {1, 2}, {4})):
        for case_dir in (root / folder).iterdir():
            seg, seg_affine, seg_dtype = _load(next(case_dir.glob("*_seg.nii.gz")))
            assert seg_dtype == np.uint8 and seg.shape == (96, 96, 62)
            labels = set(np.unique(seg).tolist())
            assert labels <= {0, 1, 2, 4} and need <= labels and not labels & forbid
            brains = []
            for f in case_dir.glob("*.nii.gz"):
                if f.name.endswith("_seg.nii.gz"):
                    continue
                img, affine, dtype = _load(f)
                assert dtype == np.int16 and img.shape == seg.shape
                np.testing.assert_array_equal(affine, seg_affine)
                assert img.min() == 0 and img.max() > 300
                brains.append(img > 0)
            for b in brains[1:]:  # skull-stripped: one brain mask, background exactly 0 everywhere
                np.testing.assert_array_equal(b, brains[0])
            assert brains[0][seg > 0].all()
            assert 0.1 < brains[0].mean() < 0.5


def _means(case):
    im, seg, t = case.images, case.seg, case.tissue
    wm = (t == 3) & (seg == 0)
    csf = (t == 1) & (seg == 0)
    return {
        (m, region): float(im[m][mask].mean())
        for m in im
        for region, mask in (
            ("wm", wm),
            ("csf", csf),
            ("necrosis", ndi.binary_erosion(seg == 1)),  # off the rim: voxels are 2.5 mm here
            ("edema", seg == 2),
            ("enhancing", seg == 4),
            ("core", (seg == 1) | (seg == 4)),
        )
    }


@pytest.mark.parametrize("centre", ["CBICA", "TCIA", "Other"])
def test_contrasts_behave_like_mri(centre_cases, centre):
    v = _means(centre_cases[centre])
    assert v["flair", "edema"] > 1.2 * v["flair", "wm"]
    assert v["t1c", "enhancing"] > 1.2 * v["t1c", "edema"]
    assert v["t1c", "enhancing"] > v["t1c", "wm"]  # the brightest structure in T1c
    assert v["t1c", "necrosis"] < v["t1c", "edema"]
    assert v["t2", "csf"] > 1.2 * v["t2", "wm"]
    assert v["t2", "edema"] > v["t2", "wm"]
    assert v["flair", "csf"] < v["flair", "wm"]
    assert v["t1", "wm"] > 1.3 * v["t1", "csf"]
    assert v["t1", "core"] < v["t1", "wm"]
    assert v["t1", "edema"] < v["t1", "wm"]


def test_lgg_contrast():
    case = phantom_case([5, 4, 0], 2.5, "public", "LGG", ("t1c",))
    assert set(case.images) == {"t1c"}
    assert set(np.unique(case.seg).tolist()) == {0, 1, 2}
    wm = (case.tissue == 3) & (case.seg == 0)
    assert case.images["t1c"][case.seg == 1].mean() < 0.8 * case.images["t1c"][wm].mean()  # not enhancing


def test_deterministic(phantom):
    a = phantom_case([3, 1, 0], 2.5, "TCIA")
    b = phantom_case([3, 1, 0], 2.5, "TCIA")
    c = phantom_case([4, 1, 0], 2.5, "TCIA")
    for m in a.images:
        np.testing.assert_array_equal(a.images[m], b.images[m])
        assert not np.array_equal(a.images[m], c.images[m])
    np.testing.assert_array_equal(a.seg, b.seg)
    assert not np.array_equal(a.seg, c.seg)
    assert not np.array_equal(a.tissue, c.tissue)  # every case has its own anatomy
    # the files are those cases: the first CBICA training case is seeded (seed, 0, 0)
    root, summary = phantom
    cid = summary["cases"]["CBICA"][0]
    again = phantom_case([0, 0, 0], 2.5, "CBICA")
    np.testing.assert_array_equal(_load(root / "HGG" / cid / f"{cid}_flair.nii.gz")[0], again.images["flair"])
    np.testing.assert_array_equal(_load(root / "HGG" / cid / f"{cid}_seg.nii.gz")[0], again.seg)


def test_rerun_resumes_without_rewriting(phantom, tmp_path):
    root, summary = phantom
    files = sorted(root.glob("*GG/*/*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert make_phantom(root, "tiny", seed=0, progress=False, cases=SMALL) == summary
    assert [f.stat().st_mtime_ns for f in sorted(root.glob("*GG/*/*.nii.gz"))] == stamps
    with pytest.raises(ValueError):
        make_phantom(root, "tiny", cases={"Hospital": 1})
    (tmp_path / "HGG" / "Brats18_CBICA_AAA_1").mkdir(parents=True)  # someone's real data
    with pytest.raises(FileExistsError):
        make_phantom(tmp_path, "tiny", progress=False, cases=SMALL)
    assert (tmp_path / "HGG" / "Brats18_CBICA_AAA_1").is_dir()


def test_centres_have_different_scanner_styles(centre_cases):
    # same seed -> same anatomy and tumour; only the scanner differs
    tissue = centre_cases["CBICA"].tissue
    assert all(np.array_equal(c.tissue, tissue) for c in centre_cases.values())
    seg = centre_cases["CBICA"].seg
    wm = ndi.binary_erosion((tissue == 3) & ~ndi.binary_dilation(seg > 0, iterations=3))
    noise = {}
    for name, case in centre_cases.items():
        img = case.images["t1"].astype(np.float64)
        high_pass = img - ndi.uniform_filter(img, 3)
        noise[name] = high_pass[wm].std() / img[wm].mean()
    assert noise["CBICA"] * 1.3 < noise["TCIA"] and noise["TCIA"] * 1.3 < noise["Other"]
    means = {name: case.images["t1"][wm].mean() for name, case in centre_cases.items()}
    assert max(means.values()) > 1.3 * min(means.values())  # different intensity scales


def _faces(mask):
    m = np.pad(mask, 1).astype(np.int8)
    return sum(int(np.abs(np.diff(m, axis=a)).sum()) for a in range(3))


def _ellipsoid_dice(mask):
    """Dice between the mask and the solid ellipsoid with the same centroid and second moments."""
    pts = np.argwhere(mask).astype(np.float64)
    mu = pts.mean(0)
    inv = np.linalg.inv(5.0 * np.cov((pts - mu).T))  # a solid ellipsoid's covariance is axes^2 / 5
    g = np.indices(mask.shape).reshape(3, -1).T - mu
    ell = (np.einsum("ni,ij,nj->n", g, inv, g) <= 1.0).reshape(mask.shape)
    return 2.0 * (ell & mask).sum() / (ell.sum() + mask.sum())


def test_tumours_are_not_round(phantom):
    """Surface (voxel faces) against a voxelised ball of equal volume on the same grid, so
    the staircase of voxelisation cancels; and overlap with the best-fitting ellipsoid."""
    root, summary = phantom
    ids = [i for ids in summary["cases"].values() for i in ids] + summary["test"]
    g = np.indices((60, 60, 60)) - 29.5
    r2 = (g**2).sum(0)
    for cid in ids:
        mask = _load(root / "HGG" / cid / f"{cid}_seg.nii.gz")[0] > 0
        n = int(mask.sum())
        radius = np.sqrt(np.sort(r2.ravel())[n - 1])  # the ball with ~n voxels
        ball = r2 <= radius**2
        assert _faces(mask) > 1.15 * _faces(ball), cid
        assert _ellipsoid_dice(mask) < 0.9, cid
        # yet one lesion: the whole tumour is connected
        assert ndi.label(mask)[1] == 1, cid
