"""Pre-training source sets of the Table III ablation: the cardiac cine stand-in, the HGG-like T1c
source (disjoint from the phantom's cases), and pre-training / a bank on each."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from modalitybank import config
from modalitybank.data.brats import SiteDataset, source_dataset
from modalitybank.data.cardiac import LABELS, cardiac_case
from modalitybank.data.phantom import GROUPS, PHANTOM_GROUPS, make_phantom
from modalitybank.data.sources import make_source, resolve_source_root, source_info

MINI = {"CBICA": 1, "TCIA": 1, "Other": 1, "test": 1, "LGG": 1}


@pytest.fixture(scope="module")
def mini_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini_phantom")
    make_phantom(root, "tiny", seed=0, progress=False, cases=MINI)
    return root


@pytest.fixture(scope="module")
def slice_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources_cache")


@pytest.fixture(scope="module")
def nonbrain_run(tmp_path_factory: pytest.TempPathFactory, slice_cache: Path) -> tuple[Path, Path, dict]:
    """A base pre-trained for 3 iterations on the cardiac set, built on demand in an empty folder."""
    from modalitybank.training import pretrain

    data = tmp_path_factory.mktemp("cardiac_root")
    run = tmp_path_factory.mktemp("pretrain_nonbrain")
    result = pretrain(run, data, scale="tiny", cache_dir=slice_cache, progress=False, source="nonbrain", iterations=3)
    return run, data, result


# ----------------------------------------------------------------------------------------------- cardiac


def test_cardiac_case_is_deterministic_by_seed() -> None:
    a, b, c = cardiac_case([0, 6, 0], 2.5), cardiac_case([0, 6, 0], 2.5), cardiac_case([1, 6, 0], 2.5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.seg, b.seg) and np.array_equal(a.body, b.body)
    assert a.image.dtype == np.int16 and a.seg.dtype == np.uint8
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert not np.array_equal(cardiac_case([0, 6, 1], 2.5).seg, a.seg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cardiac_labels_and_body_mask(seed: int) -> None:
    case = cardiac_case([seed, GROUPS["cardiac"], 0], 2.5)
    assert set(np.unique(case.seg).tolist()) == {0, 1, 2, 4}
    assert np.array_equal(case.body, case.image > 0)  # the loader's "brain" mask is the body
    assert not (case.seg[~case.body]).any()
    assert not case.body[0].any() or case.body.mean() < 0.8  # a thorax inside the field of view
    n, _, depth = case.seg.shape
    assert 8 <= depth <= 11 and n == round(340 / 2.5)
    lv, myo, rv = (case.seg == LABELS[k] for k in ("lv", "myo", "rv"))
    for k in range(depth):
        if lv[..., k].sum() > 20:  # the myocardium rings the blood pool: the pool touches no background
            ring = ndi.binary_dilation(lv[..., k], iterations=1) & ~lv[..., k]
            assert (myo[..., k] | rv[..., k])[ring].mean() > 0.9
            assert ndi.label(lv[..., k])[1] == 1
    assert rv[..., 0].sum() > 0 and not rv[..., -1].any()  # RV at the base, gone at the apex
    img = case.image.astype(np.float32)
    assert img[lv].mean() > 2.0 * img[myo].mean()  # bright blood, dark myocardium (bSSFP)


def test_make_nonbrain_source_layout_and_loader(tmp_path: Path, slice_cache: Path) -> None:
    out = tmp_path / "cardiac"
    summary = make_source(out, "nonbrain", "tiny", seed=3, progress=False, count=2)
    assert summary["complete"] and source_info(out)["source"] == "nonbrain"
    assert sorted(p.name for p in (out / "CINE").iterdir()) == summary["cases"]
    cid = summary["cases"][0]
    img = nib.load(out / "CINE" / cid / f"{cid}_t1ce.nii.gz")
    seg = np.asarray(nib.load(out / "CINE" / cid / f"{cid}_seg.nii.gz").dataobj)
    case = cardiac_case([3, GROUPS["cardiac"], 0], 2.5)
    assert np.array_equal(np.asarray(img.dataobj), case.image) and np.array_equal(seg, case.seg)
    assert np.allclose(img.affine, case.affine)
    before = (out / "CINE" / cid / f"{cid}_t1ce.nii.gz").stat().st_mtime_ns
    make_source(out, "nonbrain", "tiny", seed=3, progress=False, count=2)  # resumes: nothing rewritten
    assert (out / "CINE" / cid / f"{cid}_t1ce.nii.gz").stat().st_mtime_ns == before

    ds = source_dataset(out, "tiny", cache_dir=slice_cache, source="nonbrain")
    assert ds.case_ids == summary["cases"] and len(ds) > 0
    assert set(ds.labels.unique().tolist()) <= {0, 1, 2, 4}
    assert bool((ds.brains.bool() | (ds.labels == 0)).all())  # labels lie in the body mask
    assert 0.2 < ds.brains.float().mean() < 0.9
    with pytest.raises(FileExistsError):
        make_source(out, "hgg", "tiny", progress=False, count=1)


# ----------------------------------------------------------------------------------------------- HGG source


def test_hgg_source_is_disjoint_from_phantom_cases(mini_phantom: Path, slice_cache: Path) -> None:
    meta = json.loads((mini_phantom / "dataset.json").read_text())
    assert set(meta["counts"]) == set(PHANTOM_GROUPS)  # the phantom itself is unchanged by the new groups
    with pytest.raises(Exception, match="no 'hgg' source set"):
        source_dataset(mini_phantom, "tiny", source="hgg")  # not built yet: nothing is made while reading
    sub = resolve_source_root(mini_phantom, "hgg", build=True)
    assert sub == mini_phantom / "sources" / "hgg"
    info = source_info(sub)
    assert info["count"] == config.preset("tiny")["data"]["cases"]["HGG_source"] and info["seed"] == meta["seed"]
    source_ids = set(info["cases"])
    splits = json.loads((mini_phantom / "splits.json").read_text())
    phantom_ids = set(splits["train"]) | set(splits["test"]) | set(meta["lgg"])
    assert source_ids and not source_ids & phantom_ids
    for split in ("train", "test", "all"):
        ds = SiteDataset(mini_phantom, None, ["t1c"], split=split, cache_dir=slice_cache, max_slices_per_case=2)
        assert not source_ids & set(ds.case_ids)
    src = source_dataset(mini_phantom, "tiny", cache_dir=slice_cache, source="hgg")
    assert set(src.case_ids) == source_ids and src.modalities == ("t1c",)
    files = sorted(p.name for p in (sub / "HGG" / sorted(source_ids)[0]).iterdir())
    assert [f.split("_")[-1] for f in files] == ["seg.nii.gz", "t1ce.nii.gz"]  # T1c only
    # and the HGG-source pixels are not a phantom training case's
    sid, tid = sorted(source_ids)[0], splits["train"][0]
    a = np.asarray(nib.load(sub / "HGG" / sid / f"{sid}_t1ce.nii.gz").dataobj)
    b = np.asarray(nib.load(mini_phantom / "HGG" / tid / f"{tid}_t1ce.nii.gz").dataobj)
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------- pre-training


def test_pretrain_sources_config() -> None:
    from modalitybank.training import pretrain_meta

    assert config.pretrain_sources() == ["lgg", "hgg", "nonbrain"]
    lgg = config.pretrain_source("lgg")
    assert {k: lgg[k] for k in ("grade", "modality")} == config.experiment("pretrain")
    assert "pretrain_sources" not in config.experiments()
    on = pretrain_meta("tiny", "/data")["pretrained_on"]
    assert on["source"] == "lgg" and on["grade"] == "LGG" and on["modality"] == "t1c"
    with pytest.raises(ValueError, match="unknown pre-training source"):
        config.pretrain_source("ct")


def test_pretrain_nonbrain_records_its_source(nonbrain_run: tuple[Path, Path, dict]) -> None:
    run, data, result = nonbrain_run
    assert result["iterations"] == 3 and result["source"] == "nonbrain" and result["slices"] > 0
    info = json.loads((run / "generator.json").read_text())
    assert info["pretrained_on"]["source"] == "nonbrain" and info["pretrained_on"]["grade"] == "CINE"
    assert info["architecture"]["base_modality"] == "cine" and info["source_root"] == str(data)
    assert source_info(data)["source"] == "nonbrain"  # built on demand in the empty folder
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["losses"]
    assert set(first) == {"source/cine"}


def test_pretrain_hgg_from_a_phantom_root(mini_phantom: Path, slice_cache: Path, tmp_path: Path) -> None:
    from modalitybank.training import pretrain

    result = pretrain(tmp_path, mini_phantom, scale="tiny", cache_dir=slice_cache, progress=False, source="hgg",
                      iterations=3)
    info = json.loads((tmp_path / "generator.json").read_text())
    assert result["iterations"] == 3 and info["pretrained_on"]["source"] == "hgg"
    assert info["pretrained_on"]["grade"] == "HGG" and info["architecture"]["base_modality"] == "t1c"
    assert info["source_root"] == str(mini_phantom / "sources" / "hgg") and info["data_root"] == str(mini_phantom)


@pytest.mark.slow
def test_bank_learns_on_a_nonbrain_base(nonbrain_run, mini_phantom: Path, slice_cache: Path, tmp_path: Path) -> None:
    from modalitybank.store import load_generator
    from modalitybank.training import train_bank

    pre, _, _ = nonbrain_run
    result = train_bank(tmp_path, mini_phantom, pre, scale="tiny", experiment="missing_modality",
                        cache_dir=slice_cache, progress=False, iterations=2)
    assert result["iterations"] == 2
    info = json.loads((tmp_path / "generator.json").read_text())
    assert info["pretrained_on"]["source"] == "nonbrain" and info["modalities"] == ["flair", "t1c", "t2"]
    base_pre = torch.load(pre / "base.pt", weights_only=True)["state"]
    base_bank = torch.load(tmp_path / "base.pt", weights_only=True)["state"]
    assert all(torch.equal(base_pre[k], base_bank[k]) for k in base_pre)  # frozen
    gen, fresh = load_generator(tmp_path), load_generator(pre)
    fresh.bank.add("t1c")
    assert any(not torch.equal(a, b) for a, b in
               zip(gen.bank.entry_parameters("t1c"), fresh.bank.entry_parameters("t1c"), strict=True))
    from modalitybank.networks import mask_channels

    label = torch.tensor([0, 1, 2, 4], dtype=torch.uint8)[torch.randint(0, 4, (1, 64, 64))]
    mask = mask_channels(label, torch.ones(1, 64, 64, dtype=torch.uint8))
    with torch.no_grad():
        fakes = gen.eval().generate(mask, ["t1c", "cine"])  # t1c from its entry, cine from the plain base
    assert fakes["t1c"].shape == (1, 1, 64, 64) and not torch.equal(fakes["t1c"], fakes["cine"])


def test_cli_data_source(tmp_path: Path) -> None:
    from modalitybank.cli import build_parser, main

    assert main(["data", "source", "--kind", "nonbrain", "--scale", "tiny", "--seed", "1", "--cases", "1",
                 "--out", str(tmp_path / "c"), "--quiet", "--json"]) == 0
    assert source_info(tmp_path / "c")["cases"] == ["CineSAX_000"]
    args = build_parser().parse_args(["pretrain", "--data", "d", "--run-dir", "r", "--source", "hgg"])
    assert args.source == "hgg"
    assert build_parser().parse_args(["pretrain", "--data", "d", "--run-dir", "r"]).source == "lgg"
