"""Tests of the BraTS 2018 loader on tiny synthetic BraTS-layout folders (no phantom needed)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from modalitybank import config
from modalitybank.data import brats
from modalitybank.data.brats import BratsDataError

SHAPE = (32, 32, 8)
TUMOUR_SLICES = (2, 3, 4, 5)


def _volumes(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A brain ellipsoid with a label blob in slices 2..5; each modality has its own ramp."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in SHAPE), indexing="ij")
    brain = ((x - 15.5) / 12) ** 2 + ((y - 15.5) / 10) ** 2 <= 1.0
    seg = np.zeros(SHAPE, np.uint8)
    for k in TUMOUR_SLICES:
        seg[10:18, 12:20, k] = 2
        seg[12:16, 14:18, k] = 1
        seg[13:15, 15:17, k] = 4
    ramps = {"t1": x, "t1c": y, "t2": x + y, "flair": 31 - x}
    images = {}
    for i, m in enumerate(config.MODALITIES):
        v = (100.0 * (i + 1) + 10.0 * ramps[m] + rng.normal(0, 1, SHAPE)).astype(np.float32)
        images[m] = np.where(brain, np.maximum(v, 1.0), 0.0).astype(np.float32)
    return images, seg


def _save(arr: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


def make_case(root: Path, grade: str, case_id: str, seed: int = 0, ext: str = ".nii.gz",
              skip: tuple[str, ...] = ()) -> Path:
    folder = root / grade / case_id
    folder.mkdir(parents=True, exist_ok=True)
    images, seg = _volumes(seed)
    for m, v in images.items():
        if m not in skip:
            _save(v, folder / f"{case_id}_{config.MODALITY_SUFFIX[m]}{ext}")
    if "seg" not in skip:
        _save(seg, folder / f"{case_id}_seg{ext}")
    return folder


HGG_IDS = [
    "Brats18_CBICA_AAB_1", "Brats18_CBICA_ABC_1",
    "Brats18_TCIA01_131_1", "Brats18_TCIA02_222_1",
    "Brats18_2013_10_1", "Brats18_2013_11_1",
]
LGG_IDS = ["Brats18_TCIA10_103_1", "Brats18_2013_0_1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("brats")
    for i, cid in enumerate(HGG_IDS):
        make_case(r, "HGG", cid, seed=i, ext=".nii" if i == 1 else ".nii.gz")
    for i, cid in enumerate(LGG_IDS):
        make_case(r, "LGG", cid, seed=10 + i)
    (r / "splits.json").write_text(json.dumps({"train": HGG_IDS[0::2] + HGG_IDS[1:4:2], "test": ["Brats18_2013_11_1"]}))
    return r


# ------------------------------------------------------------------ centres, scan, split


@pytest.mark.parametrize(
    "case_id, centre",
    [
        ("Brats18_CBICA_AAB_1", "CBICA"),
        ("Brats18_TCIA01_131_1", "TCIA"),
        ("Brats18_2013_10_1", "Other"),
        ("Brats18_TCIA10_103_1", "TCIA"),
        ("BraTS19_CBICA_AAA_1", "CBICA"),
        ("BraTS19_TCIA13_615_1", "TCIA"),
        ("BraTS19_2013_2_1", "Other"),
        ("BraTS20_Training_001", "Other"),
        ("patient42", "Other"),
    ],
)
def test_centre_of(case_id: str, centre: str) -> None:
    assert brats.centre_of(case_id) == centre


def test_scan_cases(root: Path) -> None:
    recs = brats.scan_cases(root)
    assert [r.case_id for r in recs] == sorted(HGG_IDS)
    assert {r.centre for r in recs} == {"CBICA", "TCIA", "Other"}
    r = next(r for r in recs if r.case_id == HGG_IDS[1])
    assert r.files["t1c"].name == f"{HGG_IDS[1]}_t1ce.nii"  # .nii accepted
    assert set(r.files) == {*config.MODALITIES, "seg"}
    lgg = brats.scan_cases(root, grades=("LGG",))
    assert [(r.case_id, r.grade, r.centre) for r in lgg] == [
        ("Brats18_2013_0_1", "LGG", "Other"), ("Brats18_TCIA10_103_1", "LGG", "TCIA")]
    assert len(brats.scan_cases(root, grades=("HGG", "LGG"))) == 8


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(BratsDataError, match="does not exist"):
        brats.scan_cases(tmp_path / "nowhere")
    with pytest.raises(BratsDataError, match="HGG"):
        brats.scan_cases(tmp_path)
    (tmp_path / "HGG").mkdir()
    with pytest.raises(BratsDataError, match="no case"):
        brats.scan_cases(tmp_path)
    folder = make_case(tmp_path, "HGG", "Brats18_CBICA_XYZ_1", skip=("seg",))
    with pytest.raises(BratsDataError, match="segmentation") as e:
        brats.scan_cases(tmp_path)
    assert str(folder) in str(e.value)


def test_split_with_splits_json(root: Path, tmp_path: Path) -> None:
    recs = brats.scan_cases(root)
    spl = json.loads((root / "splits.json").read_text())
    assert [r.case_id for r in brats.split_cases(recs, root, "train")] == sorted(spl["train"])
    assert [r.case_id for r in brats.split_cases(recs, root, "test")] == ["Brats18_2013_11_1"]
    assert len(brats.split_cases(recs, root, "all")) == 6

    bad = tmp_path / "bad"
    make_case(bad, "HGG", "Brats18_CBICA_AAA_1")
    (bad / "splits.json").write_text(json.dumps({"train": ["Brats18_CBICA_AAA_1"], "test": ["Brats18_CBICA_NOPE_1"]}))
    with pytest.raises(BratsDataError, match="Brats18_CBICA_NOPE_1") as e:
        brats.split_cases(brats.scan_cases(bad), bad, "train")
    assert "splits.json" in str(e.value)


def test_random_split_deterministic(tmp_path: Path) -> None:
    recs = [brats.CaseRecord(f"Brats18_CBICA_{i:03d}_1", "HGG", "CBICA", tmp_path, {}) for i in range(23)]
    test0 = brats.split_cases(recs, tmp_path, "test", n_test=40, seed=0)
    train0 = brats.split_cases(recs, tmp_path, "train", n_test=40, seed=0)
    assert len(test0) == 23 // 5 and len(train0) == 23 - 23 // 5  # capped
    assert {r.case_id for r in test0}.isdisjoint(r.case_id for r in train0)
    assert brats.split_cases(recs[::-1], tmp_path, "test", n_test=40, seed=0) == test0  # order-free
    assert brats.split_cases(recs, tmp_path, "test", n_test=2, seed=0) == \
        brats.split_cases(recs, tmp_path, "test", n_test=2, seed=0)
    seeds = {tuple(r.case_id for r in brats.split_cases(recs, tmp_path, "test", n_test=3, seed=s)) for s in range(5)}
    assert len(seeds) > 1
    with pytest.raises(ValueError):
        brats.split_cases(recs, tmp_path, "valid")


# ------------------------------------------------------------------ loading and slices


def test_load_case(root: Path) -> None:
    rec = brats.scan_cases(root)[0]
    images, seg, affine = brats.load_case(rec, ["flair", "t1"])
    assert list(images) == ["flair", "t1"]
    assert images["t1"].shape == SHAPE and images["t1"].dtype == np.float32
    assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 4}
    assert affine.shape == (4, 4) and affine[0, 0] == 2.0


def test_extract_slices_native_size(root: Path) -> None:
    rec = brats.scan_cases(root)[0]
    images, seg, _ = brats.load_case(rec, config.MODALITIES)
    mods = ["t2", "t1"]
    out = brats.extract_slices(images, seg, mods, image_size=32, min_tumour_fraction=0.01)
    assert out["image"].shape == (4, 2, 32, 32) and out["image"].dtype == np.float32
    assert out["label"].shape == (4, 32, 32) and out["label"].dtype == np.uint8
    assert out["brain"].shape == (4, 32, 32) and out["brain"].dtype == np.uint8
    assert out["slice_index"].tolist() == list(TUMOUR_SLICES)
    img = out["image"]
    assert img.min() >= -1.0 and img.max() <= 1.0
    bg = out["brain"] == 0
    assert np.all(img[:, 0][bg] == -1.0) and np.all(img[:, 1][bg] == -1.0)
    assert img[:, 0][~bg].max() > 0.9  # divided by the 99.5th percentile
    np.testing.assert_array_equal(out["label"], np.moveaxis(seg[:, :, list(TUMOUR_SLICES)], -1, 0))
    # modality order: channel c equals the single-modality extraction of mods[c]
    for c, m in enumerate(mods):
        single = brats.extract_slices(images, seg, [m], 32, 0.01)
        np.testing.assert_allclose(out["image"][:, c], single["image"][:, 0], atol=1e-6)
    # t1 ramps along x (first axis), t2 along x + y: different channels
    assert not np.allclose(out["image"][:, 0], out["image"][:, 1])
    row = out["image"][0, 1, 8:24, 16]
    assert np.all(np.diff(row) > -0.05) and row[-1] > row[0]  # t1 increases along x


def test_extract_slices_resize_and_selection(root: Path) -> None:
    rec = brats.scan_cases(root)[0]
    images, seg, _ = brats.load_case(rec, ["t1c", "flair"])
    for size in (16, 48):  # shrinking (area) and enlarging (bilinear)
        out = brats.extract_slices(images, seg, ["t1c", "flair"], size, 0.01)
        assert out["image"].shape == (4, 2, size, size)
        assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
        assert np.all(out["image"][:, :, 0, 0] == -1.0)  # corner is background
        assert set(np.unique(out["label"])) == {0, 1, 2, 4}
        assert set(np.unique(out["brain"])) == {0, 1}
    few = brats.extract_slices(images, seg, ["t1c"], 16, 0.01, max_slices=2)
    assert few["slice_index"].tolist() == [2, 5]
    assert brats.extract_slices(images, seg, ["t1c"], 16, 0.01, max_slices=10)["slice_index"].tolist() == [2, 3, 4, 5]
    none = brats.extract_slices(images, seg, ["t1c"], 16, 0.9)
    assert none["image"].shape == (0, 1, 16, 16) and none["label"].shape == (0, 16, 16)


def test_extract_slices_adds_tumour_free_slices_when_asked(root: Path) -> None:
    rec = brats.scan_cases(root)[0]
    images, seg, _ = brats.load_case(rec, ["t1c"])
    free = [k for k in range(SHAPE[2]) if k not in TUMOUR_SLICES and images["t1c"][:, :, k].any()]
    both = brats.extract_slices(images, seg, ["t1c"], 16, 0.01, background_slices=2)
    picked = [k for k in both["slice_index"].tolist() if k not in TUMOUR_SLICES]
    assert len(picked) == 2 and set(picked) <= set(free)
    assert picked == [free[0], free[-1]]  # evenly spread: the lowest and the highest
    assert both["slice_index"].tolist() == sorted(both["slice_index"].tolist())
    for k, label in zip(both["slice_index"].tolist(), both["label"], strict=True):
        assert (label.any()) == (k in TUMOUR_SLICES)
    every = brats.extract_slices(images, seg, ["t1c"], 16, 0.01, background_slices=100)
    assert sorted(every["slice_index"].tolist()) == sorted([*TUMOUR_SLICES, *free])


# ------------------------------------------------------------------ cache


def test_cache_hits_and_invalidation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = make_case(data, "HGG", "Brats18_CBICA_AAA_1")
    rec = brats.scan_cases(data)[0]
    cache = brats.SliceCache(tmp_path / "cache")
    a = cache.get(rec, ["t1", "t2"], 16, 0.01)
    b = cache.get(rec, ["t1", "t2"], 16, 0.01)
    assert (cache.misses, cache.hits) == (1, 1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype
    direct = brats.extract_slices(*brats.load_case(rec, ["t1", "t2"])[:2], ["t1", "t2"], 16, 0.01)
    np.testing.assert_array_equal(direct["image"], b["image"])
    assert not list((tmp_path / "cache").glob("*.tmp"))

    # other parameters are other entries
    cache.get(rec, ["t2", "t1"], 16, 0.01)
    assert cache.misses == 2

    # a changed file invalidates
    t1 = folder / "Brats18_CBICA_AAA_1_t1.nii.gz"
    images, _ = _volumes(seed=99)
    _save(images["t1"] * 0.5 + np.where(images["t1"] > 0, 30.0, 0.0).astype(np.float32), t1)
    st = t1.stat()
    os.utime(t1, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = cache.get(rec, ["t1", "t2"], 16, 0.01)
    assert cache.misses == 3
    assert not np.array_equal(c["image"][:, 0], a["image"][:, 0])

    # a corrupt entry is recomputed
    for p in (tmp_path / "cache").glob("*.npz"):
        p.write_bytes(b"garbage")
    d = cache.get(rec, ["t1", "t2"], 16, 0.01)
    assert cache.misses == 4
    np.testing.assert_array_equal(c["image"], d["image"])


# ------------------------------------------------------------------ datasets


def test_site_dataset(root: Path, tmp_path: Path) -> None:
    ds = brats.SiteDataset(root, "CBICA", ["t1c", "flair"], split="train", image_size=16,
                           max_slices_per_case=3, cache_dir=tmp_path / "c")
    assert ds.modalities == ("t1c", "flair")
    assert ds.case_ids == ["Brats18_CBICA_AAB_1", "Brats18_CBICA_ABC_1"]
    assert all(r.centre == "CBICA" for r in ds.records)
    assert len(ds) == 6
    item = ds[0]
    assert set(item) == {"image", "label", "brain"}
    assert item["image"].shape == (2, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.uint8
    assert item["brain"].dtype == torch.uint8
    assert ds.images.is_contiguous()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 2, 16, 16)

    every = brats.SiteDataset(root, None, ["t2"], split="all", image_size=16)
    assert len(every.case_ids) == 6 and every[0]["image"].shape == (1, 16, 16)
    with pytest.raises(BratsDataError) as e:  # the only "Other" test case has no slice this large
        brats.SiteDataset(root, "Other", ["t2"], split="test", image_size=16, min_tumour_fraction=0.9)
    assert str(root) in str(e.value) and "Other" in str(e.value) and "test" in str(e.value)


def test_site_and_source_datasets(root: Path, tmp_path: Path) -> None:
    sites = brats.site_datasets(root, "missing_modality", "tiny", cache_dir=tmp_path / "c", image_size=16)
    exp = config.experiment("missing_modality")["sites"]
    assert set(sites) == set(exp)
    for site, ds in sites.items():
        assert ds.modalities == tuple(exp[site])
        assert ds[0]["image"].shape == (len(exp[site]), 16, 16)
        assert all(r.centre == site for r in ds.records)
        assert len(ds) <= config.preset("tiny")["slices"]["max_slices_per_case"] * len(ds.case_ids)
    src = brats.source_dataset(root, "tiny", image_size=16)
    assert src.modalities == ("t1c",)
    assert sorted(src.case_ids) == sorted(LGG_IDS)
    assert all(r.grade == "LGG" for r in src.records)


# ------------------------------------------------------------------ bad inputs


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, str, Path]:
    cid = "Brats18_TCIA01_999_1"
    folder = make_case(tmp_path, "HGG", cid)
    return tmp_path, cid, folder


def _load(root: Path, mods=config.MODALITIES):
    return brats.load_case(brats.scan_cases(root)[0], mods)


def test_missing_modality_file(case) -> None:
    root, cid, folder = case
    (folder / f"{cid}_t2.nii.gz").unlink()
    with pytest.raises(BratsDataError) as e:
        _load(root)
    msg = str(e.value)
    assert str(folder / f"{cid}_t2.nii.gz") in msg and "missing file" in msg and "modality t2" in msg
    _load(root, ["t1", "flair"])  # the others still load


def test_truncated_file(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_flair.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BratsDataError) as e:
        _load(root)
    assert str(p) in str(e.value) and "corrupt" in str(e.value)


def test_truncated_uncompressed_data(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_t1.nii.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: 352 + 100]))  # header intact, data cut short
    with pytest.raises(BratsDataError) as e:
        _load(root)
    assert str(p) in str(e.value) and "truncated" in str(e.value)


def test_random_bytes_file(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_t1ce.nii.gz"
    p.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(BratsDataError) as e:
        _load(root)
    assert str(p) in str(e.value) and "not a NIfTI" in str(e.value)


def test_shape_mismatch(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_t2.nii.gz"
    _save(np.ones((32, 32, 9), np.float32), p)
    with pytest.raises(BratsDataError) as e:
        _load(root)
    msg = str(e.value)
    assert str(p) in msg and "(32, 32, 9)" in msg and "(32, 32, 8)" in msg and "differs" in msg


def test_non_3d(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_t2.nii.gz"
    _save(np.ones((32, 32, 8, 2), np.float32), p)
    with pytest.raises(BratsDataError) as e:
        _load(root)
    assert str(p) in str(e.value) and "3D" in str(e.value)


def test_bad_label(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_seg.nii.gz"
    _, seg = _volumes()
    seg[0, 0, 0] = 3
    _save(seg, p)
    with pytest.raises(BratsDataError) as e:
        _load(root)
    msg = str(e.value)
    assert str(p) in msg and "labels outside" in msg and "[3]" in msg


def test_nan_in_image(case) -> None:
    root, cid, folder = case
    p = folder / f"{cid}_flair.nii.gz"
    images, _ = _volumes()
    images["flair"][5, 5, 5] = np.nan
    _save(images["flair"], p)
    with pytest.raises(BratsDataError) as e:
        _load(root)
    assert str(p) in str(e.value) and "non-finite" in str(e.value)


def test_missing_seg_at_load(case) -> None:
    root, cid, folder = case
    rec = brats.scan_cases(root)[0]
    (folder / f"{cid}_seg.nii.gz").unlink()
    with pytest.raises(BratsDataError) as e:
        brats.load_case(rec, ["t1"])
    assert str(folder / f"{cid}_seg.nii.gz") in str(e.value) and "missing file" in str(e.value)
