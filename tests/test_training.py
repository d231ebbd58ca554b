"""Reference training end to end on a small phantom: pre-train, bank, resume, baseline, synthesis."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from modalitybank.data.brats import SiteDataset
from modalitybank.store import load_generator
from modalitybank.synthesis import evaluate_generator, synthesize_cases
from modalitybank.training import train_bank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bank_run(pretrained, phantom_root, cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("bank")
    result = train_bank(run, phantom_root, pretrained, scale="tiny", experiment="missing_modality",
                        cache_dir=cache_dir, progress=False, iterations=4, checkpoint_every=2)
    return run, result


def test_pretrain_writes_a_generator_that_learned(pretrained, phantom_root, cache_dir) -> None:
    info = json.loads((pretrained / "generator.json").read_text())
    assert info["architecture"]["base_modality"] == "t1c" and info["pretrained_on"]["grade"] == "LGG"
    lines = (pretrained / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    l1 = [json.loads(line)["mean"]["g_l1"] for line in lines]
    assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])  # it learns
    assert all(np.isfinite(l1))


def test_bank_entries_learn_with_base_frozen(bank_run, pretrained) -> None:
    run, result = bank_run
    assert result["iterations"] == 4 and set(result["slices"]) == {"CBICA", "TCIA", "Other"}
    assert sorted(p.stem for p in (run / "entries").glob("*.pt")) == ["flair", "t1c", "t2"]
    base_pre = torch.load(pretrained / "base.pt", weights_only=True)["state"]
    base_bank = torch.load(run / "base.pt", weights_only=True)["state"]
    assert base_pre.keys() == base_bank.keys()
    assert all(torch.equal(base_pre[k], base_bank[k]) for k in base_pre)  # frozen
    gen = load_generator(run)
    fresh = load_generator(pretrained)
    fresh.bank.add("t2")
    assert any(not torch.equal(a, b) for a, b in
               zip(gen.bank.entry_parameters("t2"), fresh.bank.entry_parameters("t2"), strict=True))
    # sites without T2 (CBICA) have no T2 discriminator: the log shows only what each site holds
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["losses"]
    assert set(first) == {"CBICA/t1c", "CBICA/flair", "TCIA/t1c", "TCIA/t2", "Other/t2", "Other/flair"}


def test_interrupted_run_resumes(bank_run, pretrained, phantom_root, cache_dir) -> None:
    run, _ = bank_run
    before = load_generator(run).bank.entry_state("flair")
    with open(run / "metrics.jsonl", "a") as log:  # a crash after iteration 5, past the last checkpoint (4)
        log.write(json.dumps({"iteration": 5, "losses": {}, "mean": {}}) + "\n")
    result = train_bank(run, phantom_root, pretrained, scale="tiny", experiment="missing_modality",
                        cache_dir=cache_dir, progress=False, iterations=6, checkpoint_every=2)
    assert result["resumed_from"] == 4
    logged = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    after = load_generator(run).bank.entry_state("flair")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_asyndgan_baseline(phantom_root, cache_dir, tmp_path) -> None:
    result = train_bank(tmp_path, phantom_root, None, scale="tiny", experiment="multimodal", baseline="asyndgan",
                        cache_dir=cache_dir, progress=False, iterations=2)
    gen = load_generator(tmp_path)
    assert result["iterations"] == 2 and (tmp_path / "weights.pt").is_file()
    assert gen.config["output_modalities"] == ["t1", "t2", "flair"] and not gen.config["modulated"]


def test_evaluate_and_synthesize(bank_run, phantom_root, cache_dir, tmp_path) -> None:
    run, _ = bank_run
    gen = load_generator(run)
    test = SiteDataset(phantom_root, None, ["t1c", "t2", "flair"], split="test", cache_dir=cache_dir, image_size=64)
    quality = evaluate_generator(gen, test)
    assert set(quality) == {"t1c", "t2", "flair"}
    assert all(0 < q["l1"] < 2 and np.isfinite(q["psnr"]) for q in quality.values())

    out = tmp_path / "syn"
    summary = synthesize_cases(gen, phantom_root, out, ["t1c", "t2", "flair"], 64, split="test", progress=False)
    datalist = json.loads((out / "datalist.json").read_text())
    assert summary["cases"] == len(datalist["training"]) == 2
    entry = datalist["training"][0]
    seg = nib.load(phantom_root / "HGG" / entry["case"] / f"{entry['case']}_seg.nii.gz")
    for rel in entry["image"]:
        img = nib.load(out / rel)
        assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
        data = np.asarray(img.dataobj)
        assert data.max() > 0 and data[np.asarray(seg.dataobj) > 0].mean() > 0
    assert entry["synthetic"] == ["t1c", "t2", "flair"]


def test_modality_completion_keeps_real_and_fills_missing(bank_run, phantom_root, tmp_path) -> None:
    from modalitybank import config

    run, _ = bank_run
    gen = load_generator(run)
    sites = config.experiment("missing_modality")["sites"]
    out = tmp_path / "completed"
    synthesize_cases(gen, phantom_root, out, ["t1c", "t2", "flair"], 64, split="train", keep_real=True,
                     real_modalities=sites, progress=False)
    for entry in json.loads((out / "datalist.json").read_text())["training"]:
        held = sites[entry["centre"]]
        assert entry["synthetic"] == [m for m in ["t1c", "t2", "flair"] if m not in held]
        for m, rel in zip(["t1c", "t2", "flair"], entry["image"], strict=True):
            suffix = config.MODALITY_SUFFIX[m]
            src = phantom_root / "HGG" / entry["case"] / f"{entry['case']}_{suffix}.nii.gz"
            same = (out / rel).read_bytes() == src.read_bytes()
            assert same == (m in held)
