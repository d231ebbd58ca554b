"""The benchmark's pieces: HD95 in millimetres, the missing-modality channel, the tables' plan and
results; and (slow) the whole pipeline at a tiny size on the real components."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from modalitybank.benchmark.plan import Budget, load_table, privacy_variant
from modalitybank.benchmark.results import row_summary, separated_pairs
from modalitybank.bundle.seg_transforms import FillMissingModalitiesd, SpacedHausdorffDistance, voxel_spacing
from modalitybank.bundle.segmentation import brats_datalist


def _point(shape: tuple[int, ...], at: tuple[int, ...], affine: np.ndarray) -> MetaTensor:
    """A one-hot (background, object) volume holding one voxel of object at ``at``."""
    x = torch.zeros((2, *shape))
    x[0] = 1
    x[(0, *at)], x[(1, *at)] = 0, 1
    return MetaTensor(x, affine=torch.as_tensor(affine))


@pytest.mark.parametrize("spacing, offset, expected", [
    ((2.0, 1.0, 1.0), (3, 0, 0), 6.0),                   # 3 voxels along x at 2 mm
    ((2.0, 3.0, 1.0), (1, 1, 0), math.sqrt(2**2 + 3**2)),  # one voxel diagonally in x-y
    ((1.0, 1.0, 2.5), (0, 0, 2), 5.0),
])
def test_hd95_is_in_millimetres_from_the_affine(spacing, offset, expected) -> None:
    affine = np.diag([*spacing, 1.0])
    shape = (12, 12, 8)
    label = _point(shape, (4, 4, 3), affine)
    pred = _point(shape, tuple(a + b for a, b in zip((4, 4, 3), offset, strict=True)), affine)
    assert voxel_spacing(label, 3) == list(spacing)
    handler = SpacedHausdorffDistance(include_background=False, percentile=95, save_details=False)
    handler.reset()
    handler.update(([pred], [label]))
    assert handler.compute() == pytest.approx(expected, rel=1e-5)


def test_hd95_per_case_spacing_in_one_batch() -> None:
    """Two cases of different resolutions in one batch: each measured with its own spacing."""
    a = np.diag([1.0, 1.0, 1.0, 1.0])
    b = np.diag([3.0, 1.0, 1.0, 1.0])
    shape = (10, 10, 4)
    handler = SpacedHausdorffDistance(include_background=False, percentile=95, reduction="none", save_details=False)
    handler.reset()
    handler.update(([_point(shape, (5, 2, 1), a), _point(shape, (5, 2, 1), b)],
                    [_point(shape, (3, 2, 1), a), _point(shape, (3, 2, 1), b)]))
    values = handler.metric_fn.get_buffer().flatten().tolist()
    assert values == pytest.approx([2.0, 6.0])


def test_missing_channel_is_blanked_and_the_key_dropped() -> None:
    image = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4) + 1
    out = FillMissingModalitiesd("image")({"image": image, "missing": [1]})
    assert "missing" not in out
    assert (out["image"][1] == 0).all() and torch.equal(out["image"][0], image[0]) and torch.equal(out["image"][2], image[2])
    same = FillMissingModalitiesd("image")({"image": image})
    assert torch.equal(same["image"], image)
    with pytest.raises(ValueError, match="no channel"):
        FillMissingModalitiesd("image")({"image": image, "missing": [3]})


def test_datalist_of_a_centre_lacking_a_modality(phantom_root: Path) -> None:
    dl = brats_datalist(phantom_root, ["t1c", "t2", "flair"], sections={"training": "train"}, centres=["CBICA"],
                        present=["t1c", "flair"])
    assert dl["missing_modalities"] == ["t2"]
    assert dl["training"] and all(e["centre"] == "CBICA" for e in dl["training"])
    for e in dl["training"]:
        assert e["missing"] == [1]
        assert e["image"][0].endswith("_t1ce.nii.gz") and e["image"][2].endswith("_flair.nii.gz")
        assert not e["image"][1].endswith("_t2.nii.gz")  # a placeholder, blanked after loading
    full = brats_datalist(phantom_root, ["t1", "t2", "flair"], sections={"all": "all"})
    assert "missing_modalities" not in full and all("missing" not in e for e in full["all"])


def test_tables_share_recipes_and_follow_the_paper() -> None:
    t1, t2, t3 = (load_table(n) for n in (1, 2, 3))
    assert [r.name for r in t1.rows] == ["Real-All", "FedAvg-All", "Real-CBICA", "Real-TCIA", "Real-Other",
                                         "AsynDGAN", "ModalityBank", "Real-All@GAN-view"]
    assert t1.modalities == ("t1", "t2", "flair") and t2.modalities == ("t1c", "t2", "flair")
    keys1 = {r.name: r.key for r in t1.rows}
    keys3 = {r.name: r.key for r in t3.rows}
    assert keys3["Real-CBICA"] == keys1["Real-CBICA"]  # computed once for both tables
    assert keys3["ModalityBank (LGG T1c)"] == keys1["ModalityBank"]
    assert len({r.key for r in t3.rows}) == len(t3.rows)
    rows2 = {r.name: r for r in t2.rows}
    # the ceiling of Table II's synthetic rows: every centre's real T1c, T2 and FLAIR, those its site lacks included
    assert rows2["Real-All@GAN-view"].generator == "resampled" and rows2["Real-All@GAN-view"].present is None
    assert rows2["Real-CBICA(n/a:T2)"].present == ("t1c", "flair")
    assert rows2["Real-TCIA(n/a:FLAIR)"].present == ("t1c", "t2")
    assert rows2["Real-Other(n/a:T1c)"].present == ("t2", "flair")
    assert rows2["Completed-CBICA(syn:T2)"].train == "completed"
    assert {r.source for r in t3.rows if r.generator} == {"lgg", "hgg", "nonbrain"}
    with pytest.raises(ValueError, match="no rows"):
        load_table(1, ["Real-Nowhere"])
    # a diagnostic row runs only when named
    assert "ModalityBank (HGG T1c)" not in rows2
    named = load_table(2, ["ModalityBank", "ModalityBank (HGG T1c)"])
    assert [(r.name, r.source) for r in named.rows] == [("ModalityBank", "lgg"), ("ModalityBank (HGG T1c)", "hgg")]


def test_budget_is_the_same_for_central_and_federated_rows() -> None:
    for scale in ("tiny", "small", "paper"):
        b = Budget.of(scale)
        assert b.max_epochs * b.epoch_length >= b.iterations
        assert b.local_iterations * b.fedavg_rounds == b.iterations


def _seed(dice: list[float]) -> dict:
    per_case = {f"c{i}": {"dice": d, "sens": d, "spec": 0.99, "hd95": 5.0} for i, d in enumerate(dice)}
    return {"per_case": per_case, "mean": {"dice": float(np.mean(dice)), "sens": float(np.mean(dice)),
                                           "spec": 0.99, "hd95": 5.0}}


def test_privacy_variant_names_the_stages_of_a_privacy_mode() -> None:
    assert privacy_variant(None) == privacy_variant({"mode": "standard"}) == ""
    assert privacy_variant({"mode": "adversarial"}) == "-adversarial"
    assert privacy_variant({"mode": "dp", "epsilon": 8.0}) == "-dp-eps8"
    assert privacy_variant({"mode": "dp", "epsilon": 1, "clip": 0.05}) == "-dp-eps1-clip0.05"


def test_row_summary_and_differences_beyond_the_seed_spread() -> None:
    good = row_summary([_seed([0.8, 0.9]), _seed([0.82, 0.88])])
    bad = row_summary([_seed([0.5, 0.6]), _seed([0.52, 0.58])])
    noisy = row_summary([_seed([0.9, 0.9]), _seed([0.4, 0.5])])
    assert good["dice"] == pytest.approx(0.85) and good["seeds"] == 2 and good["cases"] == 2
    assert good["dice_seed_std"] == pytest.approx(0.0)
    pairs = separated_pairs({"good": good, "bad": bad, "noisy": noisy})
    assert ("good", "bad") in [(a, b) for a, b, _ in pairs]
    assert not any("noisy" in (a, b) for a, b, _ in pairs)


@pytest.mark.slow
@pytest.mark.long
def test_benchmark_table_1_end_to_end_at_tiny(phantom_root: Path, tmp_path: Path) -> None:
    """The whole pipeline, on the real components: NVFlare simulator for the bank, AsynDGAN and
    FedAvg-All; the segmentation bundle for every row; every row and column present and finite."""
    from modalitybank.cli import main

    # the user's layout: a training folder and a separate folder whose cases all form the test set
    splits = json.loads((phantom_root / "splits.json").read_text())
    train, test = tmp_path / "train", tmp_path / "test"
    for folder, cases in ((train, splits["train"]), (test, splits["test"])):
        for case in cases:
            if (phantom_root / "HGG" / case).is_dir():
                shutil.copytree(phantom_root / "HGG" / case, folder / "HGG" / case)
    shutil.copytree(phantom_root / "LGG", train / "LGG")  # the pre-training source set
    work = tmp_path / "bench"
    args = ["benchmark", "--table", "1", "--scale", "tiny", "--data", str(train), "--test-data", str(test),
            "--workdir", str(work), "--gan-iterations", "6", "--json", "--quiet"]
    assert main(args) == 0
    result = json.loads((work / "table1.json").read_text())
    names = [r.name for r in load_table(1).rows]
    assert list(result["rows"]) == names
    for name, row in result["rows"].items():
        for k in ("dice", "dice_std", "sens", "spec"):
            assert math.isfinite(row[k]) and 0.0 <= row[k] <= 1.0, (name, k, row[k])
        assert math.isfinite(row["hd95"]) or row["dice"] == 0.0, (name, row)
        assert row["cases"] == len(splits["test"])
    assert sorted(result["generators"]) == ["gan/asyndgan-multimodal-seed0", "gan/bank-multimodal-lgg-seed0"]
    for gan in result["generators"].values():
        assert gan["accepted_iterations"] == 6 and len(gan["sites"]) == 3
    text = (work / "table1.md").read_text()
    assert all(f"| {n} |" in text for n in names)
    assert (work / "table1.csv").read_text().count("\n") == len(names) + 1
    for fig in ("table1_dice.png", "table1_examples.png"):
        assert (work / fig).stat().st_size > 10_000
    cases = (work / "table1_cases.csv").read_text()
    assert all(case in cases for case in splits["test"])
    # a second run finds every stage done and only rewrites the table
    assert main(args) == 0
    again = json.loads((work / "table1.json").read_text())
    assert all(s["reused"] for s in again["stages"].values())
    assert again["rows"] == result["rows"]
    # the synthetic row with every site in privacy mode `adversarial`: a new GAN in its own stages, the real row shared
    assert main([*args, "--rows", "Real-All", "ModalityBank", "--privacy", "adversarial"]) == 0
    private = json.loads((work / "table1-adversarial.json").read_text())
    assert private["privacy"] == {"mode": "adversarial"} and list(private["rows"]) == ["Real-All", "ModalityBank"]
    assert private["rows"]["Real-All"] == result["rows"]["Real-All"]
    stages = private["stages"]
    assert not stages["gan/bank-multimodal-lgg-seed0-adversarial"]["reused"]
    assert stages["seg/real_multimodal-seed0"]["reused"]
    log = (work / "gan/bank-multimodal-lgg-seed0-adversarial/simulator.log").read_text()
    assert log.count("'mode': 'adversarial'") >= 3  # every site joined in the mode its own settings name
    assert json.loads((work / "table1.json").read_text()) == again  # the standard table untouched
    # a longer bank in stages of its own, continuing the 6-iteration one: its generator and the sites' discriminators
    assert main([*args, "--rows", "ModalityBank", "--bank-iterations", "9"]) == 0
    longer = json.loads((work / "table1-it9.json").read_text())
    gan = longer["generators"]["gan/bank-multimodal-lgg-seed0-it9"]
    assert gan["accepted_iterations"] == 9 and gan["continued_from"] == "gan/bank-multimodal-lgg-seed0"
    log = (work / "gan/bank-multimodal-lgg-seed0-it9/simulator.log").read_text()
    assert "at iteration 6" in log and log.count("resumed discriminators from") == 3
    assert not longer["stages"]["seg/synthetic_multimodal_bank-lgg-seed0-it9"]["reused"]
    assert json.loads((work / "table1.json").read_text()) == again


def test_stage_eta_uses_the_times_of_stages_of_the_same_kind(tmp_path: Path) -> None:
    from modalitybank.benchmark.stages import _COST, Stages

    planned = [("data", "data"), ("gan", "gan/a"), ("gan", "gan/b"), ("seg", "seg/x")]
    stages = Stages(tmp_path, planned, progress=False)
    assert math.isnan(stages.eta())  # nothing timed yet
    stages.times = {"data": {"kind": "data", "seconds": 10.0, "reused": True},
                    "gan/a": {"kind": "gan", "seconds": 100.0, "reused": False}}
    per_unit = 110.0 / (_COST["data"] + _COST["gan"])
    assert stages.eta() == pytest.approx(100.0 + per_unit * _COST["seg"])  # gan/b like gan/a; seg by its cost
    stages.run("seg", "seg/x", lambda folder: {"ok": True})
    assert stages.eta() == pytest.approx(100.0)  # only gan/b is left
    # a later run planning other stages times them by what any run finished in the workdir
    (tmp_path / "gan" / "a").mkdir(parents=True)
    (tmp_path / "gan" / "a" / "stage.json").write_text(json.dumps({"kind": "gan", "name": "gan/a", "seconds": 100.0}))
    later = Stages(tmp_path, [("pretrain", "pretrain/b"), ("gan", "gan/c")], progress=False)
    later.times = {"pretrain/b": {"kind": "pretrain", "seconds": 1000.0, "reused": False}}
    assert later.eta() == pytest.approx(100.0)  # the finished gan's time, not the pretraining's per unit of cost


def test_a_stage_computed_in_this_run_and_asked_for_again_is_not_counted_as_reused(tmp_path: Path) -> None:
    """Table II's Completed rows ask again for the bank this run learned: its time is this run's, not an earlier one's."""
    from modalitybank.benchmark.stages import Stages

    calls = []
    stages = Stages(tmp_path, [("gan", "gan/a"), ("synth", "synth/a")], progress=False)
    first = stages.run("gan", "gan/a", lambda folder: calls.append(folder) or {"n": 1})
    again = stages.run("gan", "gan/a", lambda folder: calls.append(folder) or {"n": 2})
    assert first == again == {"n": 1} and len(calls) == 1
    assert stages.summary()["gan/a"]["reused"] is False
    later = Stages(tmp_path, [("gan", "gan/a")], progress=False)
    later.run("gan", "gan/a", lambda folder: {"n": 3})
    assert later.summary()["gan/a"]["reused"] is True


def test_scanner_bias_on_a_z_scored_patch_is_a_raw_intensity_bias_field() -> None:
    """The bundle's bias-field augmentation acts on z-scored patches; shifted by ``brain_mean_z`` it is
    exactly a raw-intensity bias field for a brain whose mean is that many standard deviations."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, RandBiasField

    from modalitybank.resources import bundle_dir

    parser = ConfigParser()
    parser.read_config(str(bundle_dir("tumor_segmentation") / "configs" / "train.json"))
    parser["scanner_transforms#1#prob"] = 1.0
    bias = Compose(parser.get_parsed_content("scanner_transforms")[:3])
    k = parser.get_parsed_content("brain_mean_z")
    field_args = {key: parser[f"scanner_transforms#1#{key}"] for key in ("degree", "coeff_range")}

    rng = np.random.default_rng(0)
    sigma = 50.0
    raw = torch.as_tensor(k * sigma + sigma * rng.standard_normal((3, 32, 32)), dtype=torch.float32)
    z = (raw - k * sigma) / sigma
    bias.transforms[1].set_random_state(7)
    out = bias({"image": z})["image"]
    field = RandBiasField(prob=1.0, **field_args).set_random_state(7)(torch.ones(3, 32, 32))
    assert not torch.allclose(field, torch.ones_like(field))  # a field was drawn
    expected = (raw * field - k * sigma) / sigma
    assert torch.allclose(out, expected, atol=1e-4)


def test_a_workdir_refuses_stages_of_other_settings(tmp_path: Path) -> None:
    from modalitybank.benchmark.settings import (
        SETTINGS_FILE,
        WorkdirSettingsError,
        check_settings,
        settings_of,
    )

    settings = settings_of("tiny", None, None, None)
    assert settings["bundles"]["tumor_segmentation"] == json.loads(
        (Path(__file__).resolve().parents[1] / "bundles/tumor_segmentation/configs/metadata.json").read_text())["version"]
    check_settings(tmp_path, settings)  # a new workdir: recorded
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings
    check_settings(tmp_path, settings_of("tiny", None, None, None))  # the same settings: accepted

    changed = json.loads(json.dumps(settings))
    changed["preset"]["slices"]["max_slices_per_case"] += 1
    changed["bundles"]["tumor_segmentation"] = "9.9.9"
    with pytest.raises(WorkdirSettingsError, match=r"bundles\.tumor_segmentation: \"[0-9.]+\" -> \"9\.9\.9\"; "
                                                   r"preset\.slices\.max_slices_per_case: 12 -> 13"):
        check_settings(tmp_path, changed)
    with pytest.raises(WorkdirSettingsError, match="gan_iterations: null -> 20"):
        check_settings(tmp_path, settings_of("tiny", None, None, 20))
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings  # the record is untouched
    with pytest.raises(WorkdirSettingsError, match="--adopt-workdir"):  # the message says how to keep stages
        check_settings(tmp_path, changed)
    check_settings(tmp_path, changed, adopt=True)  # the dependent stages removed, the new settings recorded
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == changed
    assert json.loads((tmp_path / "settings.1.json").read_text()) == settings  # the old record kept
    check_settings(tmp_path, changed)  # accepted from now on

    old = tmp_path / "old"
    (old / "seg" / "real-seed0").mkdir(parents=True)
    (old / "seg" / "real-seed0" / "stage.json").write_text("{}")
    with pytest.raises(WorkdirSettingsError, match="no settings.json"):
        check_settings(old, settings)
    assert not (old / SETTINGS_FILE).exists()
    check_settings(old, settings, adopt=True)
    assert json.loads((old / SETTINGS_FILE).read_text()) == settings
