"""Real hospitals: each site's own folder and modalities, any number of sites with their own names."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from modalitybank import config
from modalitybank.data.brats import discover_site, site_datasets
from modalitybank.data.sites import split_sites
from modalitybank.fl.executor import SiteExecutor
from modalitybank.fl.jobs import simulate

NAMES = ["hospital-north", "hospital-south", "hospital-east", "hospital-west", "hospital-centre"]


def _own_copy(link: Path) -> Path:
    """Replace a site's link to a shared case folder by a copy the test may change."""
    target = link.resolve()
    link.unlink()
    shutil.copytree(target, link)
    return link


def test_split_deals_every_case_once(phantom_root, tmp_path) -> None:
    folders = split_sites(phantom_root, tmp_path, NAMES, split="all")
    cases = sorted(p.name for f in folders.values() for p in f.glob("*/*"))
    assert len(cases) == len(set(cases)) == len(list(phantom_root.glob("HGG/*"))) + len(list(phantom_root.glob("LGG/*")))
    config = json.loads((tmp_path / "modalitybank_site.json").read_text())
    assert config["sites"] == {n: {"data_root": str(tmp_path / n)} for n in NAMES}


def test_discovery_skips_a_case_lacking_a_modality_the_site_holds(phantom_root, tmp_path) -> None:
    site = split_sites(phantom_root, tmp_path, ["a"], split="train")["a"]
    first, *_ = sorted(site.glob("HGG/*"))
    next(_own_copy(first).glob("*_t2.nii.gz")).unlink()
    modalities, cases, skipped, grades = discover_site(site)
    assert modalities == ["t1", "t1c", "t2", "flair"] and grades == ("HGG",)
    assert first.name not in cases and len(skipped) == 1 and f"case {first.name} skipped: missing" in skipped[0]


def test_a_federated_site_trains_on_the_slices_of_the_single_process_reference(phantom_root, cache_dir,
                                                                              monkeypatch) -> None:
    """The preset's tumour-free slices reach a federated site too (they once did not: the bank learned on
    tumour slices only, while the reference and the pre-training also had the rest of the brain)."""
    tiny = config.preset("tiny")
    tiny["slices"]["background_slices_per_case"] = 3
    monkeypatch.setattr(config, "preset", lambda scale: json.loads(json.dumps(tiny)))
    executor = SiteExecutor(scale="tiny", experiment="missing_modality", data_root=str(phantom_root),
                            cache_dir=str(cache_dir))
    executor.site = "site-1"
    site, where = executor._load({}, None)
    centre = config.centre_of_site("site-1")
    reference = site_datasets(phantom_root, "missing_modality", "tiny", cache_dir=cache_dir)[centre]
    assert where == f"centre {centre}" and site.modalities == reference.modalities
    assert torch.equal(site.slice_index, reference.slice_index) and torch.equal(site.images, reference.images)
    tumour_free = int((site.labels.flatten(1) == 0).all(dim=1).sum())
    assert tumour_free == 3 * len(site.case_ids)


@pytest.mark.slow
def test_five_named_sites_with_their_own_folders_and_modalities(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    folders = split_sites(phantom_root, tmp_path / "sites", NAMES, split="all", grades=("HGG",))
    big = next(n for n in NAMES if len(list(folders[n].glob("HGG/*"))) >= 2)  # a case missing a file: skipped
    bad_case = sorted(folders[big].glob("HGG/*"))[0]
    next(_own_copy(bad_case).glob("*_t2.nii.gz")).unlink()
    no_flair = next(n for n in NAMES if n != big)  # a site without FLAIR at all
    for case in folders[no_flair].glob("*/*"):
        next(_own_copy(case).glob("*_flair.nii.gz")).unlink()
    config = json.loads((tmp_path / "sites" / "modalitybank_site.json").read_text())
    config["default"] = {"cache_dir": str(cache_dir)}
    (tmp_path / "site_config.json").write_text(json.dumps(config))

    result = simulate("modalitybank_multimodal", tmp_path / "run", scale="tiny", rounds=3, clients=NAMES,
                      progress=False, pretrained=str(pretrained), site_config=tmp_path / "site_config.json")
    log = Path(result["log"]).read_text()
    assert result["rounds"] == 3 and result["sites"] == sorted(NAMES)
    for name in NAMES:
        expected = "['t1', 't2']" if name == no_flair else "['t1', 't2', 'flair']"
        assert f"site {name} joined:" in log and f"modalities {expected}" in log.split(f"site {name} joined:")[1][:80]
    assert f"site {big}: case {bad_case.name} skipped: missing" in log
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert f"{no_flair}/flair" not in metrics[-1]["losses"] and f"{no_flair}/t1" in metrics[-1]["losses"]


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "entries").glob("*.pt")}


@pytest.mark.slow
def test_a_modality_that_joins_later_learns_only_its_own_entry(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    from modalitybank.store import read_info

    common = {"scale": "tiny", "rounds": 2, "progress": False, "data_root": str(phantom_root),
              "cache_dir": str(cache_dir), "pretrained": str(pretrained)}
    first = simulate("modalitybank_missing_modality", tmp_path / "first", **common)  # T1c + T2 + FLAIR
    before = _hashes(Path(first["checkpoint"]))
    assert sorted(before) == ["flair", "t1c", "t2"]
    # T1 joins: the sites that hold it learn a new entry; the base and every other entry stay as they are
    second = simulate("modalitybank_multimodal", tmp_path / "second", resume_from=first["checkpoint"],
                      add_modalities="t1", **common)
    checkpoint = Path(second["checkpoint"])
    after = _hashes(checkpoint)
    assert sorted(after) == ["flair", "t1", "t1c", "t2"] and all(after[m] == before[m] for m in before)
    assert second["rounds"] == 2 and second["sites"] == ["site-1", "site-2", "site-3"]
    sent = {json.loads(line)["key"] for line in next(Path(p) for p in second["ledgers"] if "/server/" in p)
            .read_text().splitlines() if json.loads(line)["direction"] == "sent"}
    assert sent - {None} == {"fake/t1"}  # only the new entry is learned (None: the hellos carry no key)
    provenance = read_info(checkpoint)["provenance"]
    assert provenance["t1"]["sites"] == {"site-1": 2, "site-2": 2, "site-3": 2}
    assert provenance["t2"] == read_info(first["checkpoint"])["provenance"]["t2"]  # carried over
    # held-out quality of the added entry, reported like the others by the command a user runs
    proc = subprocess.run(["modalitybank", "report", str(checkpoint), "--data", str(phantom_root), "--cache-dir",
                           str(cache_dir), "--experiment", "missing_modality", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    quality = json.loads(proc.stdout.strip().splitlines()[-1])["quality"]
    assert list(quality) == ["t1", "t1c", "t2", "flair"]
    assert quality["t1"]["psnr"] > 10 and all(q["l1"] > 0 for q in quality.values())


def test_a_federated_site_uses_the_loss_weights_of_the_preset(monkeypatch) -> None:
    """``l1_balance`` (and ``lambda_l1``) reach a site's loss from the preset, with or without its bundle."""
    from modalitybank.bundle.discriminator import site_discriminator_from_bundle
    from modalitybank.resources import bundle_dir
    from modalitybank.training import TrainSettings

    tiny = config.preset("tiny")
    tiny["train"]["l1_balance"] = 0.25
    monkeypatch.setattr(config, "preset", lambda scale: json.loads(json.dumps(tiny)))
    executor = SiteExecutor(scale="tiny")
    executor.site, executor.modalities = "site-1", ["t2"]
    executor.settings = TrainSettings.from_preset("tiny", "bank")
    _, loss = executor._discriminators(None)
    assert (loss.lambda_l1, loss.l1_balance) == (tiny["train"]["lambda_l1"], 0.25)
    _, _, bundle_loss = site_discriminator_from_bundle(bundle_dir("site_discriminator"), {"scale": "tiny"})
    assert bundle_loss == loss
