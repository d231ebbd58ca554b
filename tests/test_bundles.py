"""The MONAI bundles in bundles/: metadata, network I/O, TorchScript export, training and inference,
run through ``python -m monai.bundle`` as a user runs them (subprocesses), on a small phantom."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "schema" / "metadata.json"
GENERATOR = BUNDLES / "modalitybank_generator"
DISCRIMINATOR = BUNDLES / "site_discriminator"
SEGMENTATION = BUNDLES / "tumor_segmentation"
ALL_BUNDLES = [GENERATOR, DISCRIMINATOR, SEGMENTATION]

#: What MONAI's official meta_schema_20240725.json requires (top level, and of a tensor specifier).
OFFICIAL_REQUIRED = {"schema", "version", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format"}
OFFICIAL_TENSOR_REQUIRED = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range"}

#: TorchScript against eager: the same operations on the same weights.
TS_ATOL = 1e-5


def bundle(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` from the repository root; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def cfg(b: Path, name: str) -> str:
    return str(b / "configs" / name)


def _meta(b: Path) -> dict:
    return json.loads((b / "configs" / "metadata.json").read_text())


# -- metadata -------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", ALL_BUNDLES, ids=lambda b: b.name)
def test_verify_metadata(b: Path) -> None:
    md5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()  # the file validated against is exactly ours
    proc = bundle("verify_metadata", "--meta_file", cfg(b, "metadata.json"), "--filepath", str(SCHEMA),
                  "--hash_val", md5, "--hash_type", "md5")
    out = proc.stdout + proc.stderr
    assert "metadata is verified with no error" in out
    assert "skipped downloading" in out  # our schema file was read, nothing was fetched


def test_verify_metadata_reads_our_schema(tmp_path: Path) -> None:
    """Metadata the official schema accepts but ours rejects (version not semantic, a tensor without
    channel_def) fails: verify_metadata validated against bundles/schema/metadata.json."""
    from monai.bundle import verify_metadata

    md5 = {"hash_val": hashlib.md5(SCHEMA.read_bytes()).hexdigest(), "hash_type": "md5"}
    meta = _meta(SEGMENTATION)
    meta["version"] = "first"
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="first"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA), **md5)
    meta = _meta(SEGMENTATION)
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA), **md5)
    verify_metadata(meta_file=cfg(SEGMENTATION, "metadata.json"), filepath=str(SCHEMA), **md5)


def test_schema_requires_what_the_official_schema_requires() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert OFFICIAL_REQUIRED <= set(schema["required"])
    assert OFFICIAL_TENSOR_REQUIRED <= set(schema["$defs"]["tensor"]["required"])


@pytest.mark.parametrize("b", ALL_BUNDLES, ids=lambda b: b.name)
def test_bundle_layout_and_metadata(b: Path) -> None:
    meta = _meta(b)
    assert meta["version"] in meta["changelog"]
    assert (b / "LICENSE").read_text().lstrip().startswith("Apache License")
    readme = (b / "docs" / "README.md").read_text()
    for section in ("Overview", "Data", "Training", "Performance", "Commands", "References"):
        assert f"## {section}" in readme, f"{b.name}/docs/README.md lacks a '{section}' section"
    assert not (b / "scripts").exists()  # configs import modalitybank; no `scripts` module to collide


@pytest.mark.parametrize("b", ALL_BUNDLES, ids=lambda b: b.name)
def test_configs_name_no_absolute_path(b: Path) -> None:
    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    for path in (b / "configs").glob("*.json"):
        for s in strings(json.loads(path.read_text())):
            assert not s.startswith("/") and not s.startswith("$'/") and "'/workspace" not in s, f"{path}: {s!r}"


def test_segmentation_metadata_is_what_monai_label_reads() -> None:
    pred = _meta(SEGMENTATION)["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "tumor"}
    infer = json.loads((SEGMENTATION / "configs" / "inference.json").read_text())
    assert {"network_def", "preprocessing", "inferer", "postprocessing"} <= set(infer)
    # MONAI Label (own venv) evaluates every import statement of a config it reads: modalitybank is
    # imported lazily, only by the keys that build datalists from a data folder
    train = json.loads((SEGMENTATION / "configs" / "train.json").read_text())
    for config in (infer, train):
        assert not any("modalitybank" in i for i in config.get("imports", []))
    assert {"network", "train", "validate"} <= set(train)
    assert {"max_epochs"} <= set(train["train"]["trainer"]) and "data" in train["train"]["dataset"]
    assert "data" in train["validate"]["dataset"]


# -- network I/O ----------------------------------------------------------------------------------
@pytest.mark.parametrize("b", ALL_BUNDLES, ids=lambda b: b.name)
def test_verify_net_in_out(b: Path) -> None:
    """What model-zoo's ci/verify_bundle.py runs: verify_net_in_out on network_def of inference.json."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=cfg(b, "metadata.json"), config_file=cfg(b, "inference.json"),
                      bundle_root=str(b), n=2, device="cpu")


@pytest.mark.parametrize("b", ALL_BUNDLES, ids=lambda b: b.name)
def test_ckpt_export_of_model_pt_in_one_step(b: Path, tmp_path: Path) -> None:
    """ckpt_export of network_def from models/model.pt (verify_bundle.py's TorchScript check), and the
    TorchScript module computes what the eager network_def with model.pt loaded computes."""
    from monai.bundle import ConfigParser, ckpt_export
    from monai.data import load_net_with_metadata

    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(b / "models" / "model.pt"),
                meta_file=cfg(b, "metadata.json"), config_file=cfg(b, "inference.json"), bundle_root=str(b))
    scripted, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=["inference.json"])
    assert isinstance(scripted, torch.jit.ScriptModule) and meta["version"] == _meta(b)["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    parser = ConfigParser()
    parser.read_config(cfg(b, "inference.json"))
    parser["bundle_root"] = str(b)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(b / "models" / "model.pt", weights_only=True))
    channels = _meta(b)["network_data_format"]["inputs"]["image"]["num_channels"]
    x = torch.rand(2, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    if b is not SEGMENTATION:
        x[:, :5] = (x[:, :5] > 0.5).float()  # mask channels are binary
    with torch.no_grad():
        eager, ts_out = net.eval()(x), scripted(x)
    assert ts_out.shape == eager.shape
    assert (ts_out - eager).abs().max().item() <= TS_ATOL


# -- the generator bundle -------------------------------------------------------------------------
def test_shipped_generator_loads_and_folds() -> None:
    from modalitybank.bundle import folded_generator, generator_modalities
    from modalitybank.store import load_generator, read_info

    models = GENERATOR / "models"
    info = read_info(models)
    assert sorted(p.stem for p in (models / "entries").glob("*.pt")) == sorted(_meta(GENERATOR)["modalities"])
    assert info["architecture"]["base_modality"] == _meta(GENERATOR)["base_modality"]
    assert not any(os.path.isabs(str(v)) for v in info.values() if isinstance(v, str))
    assert (models / "base.pt").stat().st_size < 2_000_000
    assert all(p.stat().st_size < 500_000 for p in (models / "entries").glob("*.pt"))
    gen = load_generator(models).eval()
    x = torch.zeros(1, 5, 64, 64)
    x[:, 0, 8:56, 8:56] = 1
    x[:, 4, 8:56, 8:56] = 1
    outs = {}
    with torch.no_grad():
        for m in generator_modalities(models):
            folded = folded_generator(models, m)(x)
            torch.testing.assert_close(folded, gen.generate(x, [m])[m], atol=1e-5, rtol=0)
            outs[m] = folded
    assert not torch.allclose(outs["t2"], outs["flair"], atol=1e-3)  # entries differ
    with pytest.raises(KeyError, match="t1"):
        folded_generator(models, "t1")


def test_generator_model_pt_holds_every_entry_and_modality_selects_one() -> None:
    from modalitybank.bundle import BankGenerator
    from modalitybank.store import load_generator, read_info

    models = GENERATOR / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    entries = {k.split(".entries.")[1].split(".")[0] for k in state if ".entries." in k}
    assert entries == set(_meta(GENERATOR)["modalities"]) == set(read_info(models)["modalities"])
    gen = load_generator(models).eval()
    assert set(state) == {f"generator.{k}" for k in gen.state_dict()}  # the base and every entry, nothing else
    x = (torch.rand(2, 5, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    outs = {}
    with torch.no_grad():
        for m in ("t1c", "t2", "flair"):
            net = BankGenerator(read_info(models)["architecture"], read_info(models)["modalities"], m)
            net.load_state_dict(state)
            outs[m] = net.eval()(x)
            torch.testing.assert_close(outs[m], gen.generate(x, [m])[m], atol=1e-6, rtol=0)
    assert (outs["t2"] - outs["flair"]).abs().mean() > 0.01  # the modality key changes the output
    with pytest.raises(KeyError, match="t1"):
        BankGenerator(read_info(models)["architecture"], read_info(models)["modalities"], "t1")


def test_ckpt_export_generator_from_the_command_line(tmp_path: Path) -> None:
    """The documented one-step export: ckpt_export network_def --modality t2 from models/model.pt."""
    from monai.data import load_net_with_metadata

    from modalitybank.store import load_generator

    ts_path = tmp_path / "model_t2.ts"
    bundle("ckpt_export", "network_def", "--config_file", cfg(GENERATOR, "inference.json"),
           "--meta_file", cfg(GENERATOR, "metadata.json"), "--modality", "t2",
           "--ckpt_file", str(GENERATOR / "models" / "model.pt"), "--filepath", str(ts_path))
    scripted, _, _ = load_net_with_metadata(str(ts_path))
    x = (torch.rand(2, 5, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        eager = load_generator(GENERATOR / "models").eval().generate(x, ["t2"])
        assert (scripted(x) - eager["t2"]).abs().max().item() <= TS_ATOL


@pytest.fixture(scope="module")
def generator_models(phantom_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/ as the generator bundle's pretrain.json (2 iterations) and train.json (the trainer's
    max_epochs and the optimiser's lr overridden as in any bundle: 2 epochs of 1 iteration) write it."""
    work = tmp_path_factory.mktemp("generator_bundle")
    common = ["--dataset_dir", str(phantom_root), "--cache_dir", str(cache_dir), "--progress", "False",
              "--pretrain_dir", str(work / "pretrain")]
    bundle("run", "--config_file", cfg(GENERATOR, "pretrain.json"), *common, "--iterations", "2")
    proc = bundle("run", "--config_file", cfg(GENERATOR, "train.json"), *common, "--bank_dir", str(work / "bank"),
                  "--models_dir", str(work / "models"), "--epoch_length", "1", "--trainer#max_epochs", "2",
                  "--optimizer#lr", "0.0001", "--log_every", "1")
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    return work


@pytest.mark.slow
def test_generator_bundle_trains_into_the_store_layout(generator_models: Path) -> None:
    models = generator_models / "models"
    assert sorted(p.name for p in models.iterdir()) == ["base.pt", "entries", "generator.json", "model.pt"]
    assert sorted(p.stem for p in (models / "entries").glob("*.pt")) == ["flair", "t1c", "t2"]
    info = json.loads((models / "generator.json").read_text())
    assert info["stage"] == "bank" and info["experiment"] == "missing_modality"
    assert info["pretrained_from"] == "pretrain" and not os.path.isabs(info["data_root"])
    pre = torch.load(generator_models / "pretrain" / "base.pt", weights_only=True)["state"]
    shipped = torch.load(models / "base.pt", weights_only=True)["state"]
    assert all(torch.equal(pre[k], shipped[k]) for k in pre)  # the base stayed frozen
    assert len((generator_models / "bank" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_generator_train_config_runs_the_gan_trainer_with_overrides(generator_models: Path) -> None:
    """--trainer#max_epochs 2 --epoch_length 1 --optimizer#lr 1e-4: two GanTrainer iterations, losses logged
    finite, the entries learned and published, the state checkpointed with the overridden lr."""
    import re

    from modalitybank.bundle import BankGenerator
    from modalitybank.store import read_info

    log = (generator_models / "train.log").read_text()
    assert "Epoch[2] Complete" in log and "Epoch[3]" not in log
    logged = [float(v) for v in re.findall(r"g_l1: ([-+0-9.eE]+|nan|inf)", log)]
    assert len(logged) == 2 and all(np.isfinite(logged))
    lines = [json.loads(line) for line in (generator_models / "bank" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    assert all(np.isfinite(v) for line in lines for v in line["mean"].values())
    state = torch.load(generator_models / "bank" / "state.pt", weights_only=False)
    assert state["iteration"] == 2 and state["g_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    models = generator_models / "models"
    pre_entry = torch.load(models / "entries" / "t2.pt", weights_only=True)["state"]
    gamma = next(k for k in pre_entry if k.endswith("gamma"))
    base = torch.load(generator_models / "pretrain" / "base.pt", weights_only=True)["state"]
    from modalitybank.layers import weight_statistics

    _, std = weight_statistics(base[gamma.replace(".gamma", ".weight")])
    assert not torch.allclose(pre_entry[gamma], std.flatten(2).squeeze(-1))  # learned, not the identity entry
    info = read_info(models)
    net = BankGenerator(info["architecture"], info["modalities"], "t2")
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # model.pt published with the run


@pytest.mark.slow
def test_generator_inference_writes_one_nifti_per_modality(generator_models: Path, phantom_root: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    bundle("run", "--config_file", cfg(GENERATOR, "inference.json"), "--models_dir", str(generator_models / "models"),
           "--dataset_dir", str(phantom_root), "--split", "test", "--output_dir", str(out),
           "--modalities", "['t2','flair']")
    tests = json.loads((phantom_root / "splits.json").read_text())["test"]
    assert sorted(p.name for p in out.iterdir()) == sorted(tests)
    for case in tests:
        seg = nib.load(phantom_root / "HGG" / case / f"{case}_seg.nii.gz")
        brain = np.asarray(nib.load(phantom_root / "HGG" / case / f"{case}_t1.nii.gz").dataobj) > 0
        assert sorted(p.name for p in (out / case).iterdir()) == [f"{case}_flair.nii.gz", f"{case}_t2.nii.gz"]
        for suffix in ("t2", "flair"):
            img = nib.load(out / case / f"{case}_{suffix}.nii.gz")
            data = np.asarray(img.dataobj)
            assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
            assert data.dtype == np.int16 and data[brain].max() > 0 and (data[~brain] == 0).all()


# -- the site discriminator bundle ----------------------------------------------------------------
def test_site_discriminator_from_bundle_is_what_the_reference_loop_builds() -> None:
    from modalitybank import config
    from modalitybank.bundle import JointInputDiscriminator, site_discriminator_from_bundle
    from modalitybank.gan import GanLoss, site_step
    from modalitybank.networks import ConditionalDiscriminator, build_discriminator, mask_channels
    from modalitybank.training import TrainSettings, make_site_models

    torch.manual_seed(0)
    d, opt, loss = site_discriminator_from_bundle(DISCRIMINATOR)
    torch.manual_seed(0)
    ref = build_discriminator(config.preset("tiny")["model"])
    assert isinstance(d, ConditionalDiscriminator)
    assert d.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), ref.state_dict().values(), strict=True))
    settings = TrainSettings.from_preset("tiny", "bank")
    site_opt = make_site_models({"s": ["t2"]}, config.preset("tiny")["model"], settings)["s"].optimizers["t2"]
    assert type(opt) is type(site_opt)
    for key in ("lr", "betas"):
        assert opt.defaults[key] == site_opt.defaults[key]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in d.parameters()}
    assert loss == GanLoss(lambda_l1=settings.lambda_l1)

    small, _, _ = site_discriminator_from_bundle(DISCRIMINATOR, {"scale": "small"})
    ref_small = build_discriminator(config.preset("small")["model"])
    assert [v.shape for v in small.state_dict().values()] == [v.shape for v in ref_small.state_dict().values()]

    # it works where the site uses it, and the one-input form used by MONAI's tools is the same network
    label = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (2, 32, 32))]
    mask = mask_channels(label, torch.ones(2, 32, 32))
    real, fake = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    grad, losses = site_step(d, opt, mask, real, fake, loss)
    assert grad.shape == fake.shape and np.isfinite(losses["d"])
    joint = JointInputDiscriminator(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(joint(torch.cat([mask, real], 1)), d.eval()(mask, real))


@pytest.mark.slow
def test_site_discriminator_inference_writes_realism_maps(phantom_root: Path, tmp_path: Path) -> None:
    """inference.json scores each test case's (label map, FLAIR) pair into a realism map (NIfTI) and a JSON."""
    out = tmp_path / "realism"
    bundle("run", "--config_file", cfg(DISCRIMINATOR, "inference.json"), "--dataset_dir", str(phantom_root),
           "--split", "test", "--output_dir", str(out))
    tests = sorted(json.loads((phantom_root / "splits.json").read_text())["test"])
    summary = json.loads((out / "realism.json").read_text())
    assert sorted(summary["cases"]) == tests
    for case in tests:
        seg = nib.load(phantom_root / "HGG" / case / f"{case}_seg.nii.gz")
        brain = np.asarray(nib.load(phantom_root / "HGG" / case / f"{case}_flair.nii.gz").dataobj) > 0
        realism = nib.load(out / case / f"{case}_realism.nii.gz")
        data = np.asarray(realism.dataobj)
        assert realism.shape == seg.shape and np.allclose(realism.affine, seg.affine)
        assert 0 <= data.min() and data.max() <= 1 and (data[~brain] == 0).all() and data[brain].max() > 0
        per_case = json.loads((out / case / f"{case}_realism.json").read_text())
        assert per_case["tumour_slices"] > 0 and 0 <= per_case["score"] <= 1
        assert per_case["score"] == pytest.approx(summary["cases"][case]["score"])


def _realism_scores(phantom_root: Path) -> dict[str, list[float]]:
    """Scores of the shipped discriminator for real (mask, FLAIR) pairs, for mismatched ones (the mask of
    one case with the FLAIR of the next) and for the shipped generator's FLAIR of each mask."""
    from monai.bundle import ConfigParser

    from modalitybank.bundle import folded_generator, realism_volume
    from modalitybank.synthesis import synthesize_volume

    parser = ConfigParser()
    parser.read_config(cfg(DISCRIMINATOR, "inference.json"))
    parser["bundle_root"] = str(DISCRIMINATOR)
    parser["device"] = "cpu"
    net, size = parser.get_parsed_content("network"), parser.get_parsed_content("image_size")
    cases = sorted(p.name for p in (phantom_root / "HGG").iterdir())

    def load(case: str, suffix: str) -> np.ndarray:
        return np.asarray(nib.load(phantom_root / "HGG" / case / f"{case}_{suffix}.nii.gz").dataobj)

    generator = folded_generator(GENERATOR / "models", "flair")
    scores: dict[str, list[float]] = {"real": [], "mismatched": [], "synthetic": []}
    for i, case in enumerate(cases):
        seg, flair = load(case, "seg"), load(case, "flair")
        scores["real"].append(realism_volume(net, seg, flair, size)[1]["score"])
        scores["mismatched"].append(realism_volume(net, seg, load(cases[(i + 1) % len(cases)], "flair"), size)[1]["score"])

        class _Folded(torch.nn.Module):  # synthesize_volume asks for generate(mask, modalities)
            def generate(self, mask: torch.Tensor, modalities: list[str]) -> dict[str, torch.Tensor]:
                return {m: generator(mask) for m in modalities}

        fake = synthesize_volume(_Folded(), seg.astype(np.uint8), flair > 0, ["flair"], size)["flair"]
        scores["synthetic"].append(realism_volume(net, seg, fake.astype(np.float32), size)[1]["score"])
    return scores


@pytest.mark.slow
def test_site_discriminator_scores_real_pairs_above_mismatched_and_synthetic(phantom_root: Path) -> None:
    scores = _realism_scores(phantom_root)
    real, mismatched, synthetic = (np.array(scores[k]) for k in ("real", "mismatched", "synthetic"))
    assert real.mean() > mismatched.mean() + 0.05, scores
    assert real.mean() > synthetic.mean() + 0.05, scores


# -- the segmentation bundle ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One short epoch of train.json on the phantom (its train split; validation on its test split)."""
    work = tmp_path_factory.mktemp("segmentation_bundle")
    proc = bundle("run", "--config_file", cfg(SEGMENTATION, "train.json"), "--dataset_dir", str(phantom_root),
                  "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"),
                  "--train#trainer#max_epochs", "1", "--num_samples", "2")
    return work, proc


@pytest.mark.slow
def test_segmentation_trains_and_validates(seg_run, phantom_root: Path) -> None:
    work, proc = seg_run
    log = proc.stdout + proc.stderr
    assert "Epoch[1] Metrics" in log and "val_mean_dice" in log and "val_hd95" in log
    dice = float(log.split("val_mean_dice: ")[1].split()[0])
    assert 0.0 <= dice <= 1.0
    state = torch.load(work / "models" / "model.pt", weights_only=True)
    from monai.networks.nets import BasicUNet

    BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(16, 16, 32, 64, 128, 16)).load_state_dict(state)
    datalist = json.loads(next((work / "eval").glob("datalist_*.json")).read_text())
    splits = json.loads((phantom_root / "splits.json").read_text())
    assert sorted(e["case"] for e in datalist["training"]) == sorted(c for c in splits["train"] if
                                                                     (phantom_root / "HGG" / c).is_dir())
    assert sorted(e["case"] for e in datalist["validation"]) == sorted(splits["test"])
    assert all(len(e["image"]) == 3 and e["image"][0].endswith("_t1ce.nii.gz") for e in datalist["training"])
    assert list((work / "eval").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_segmentation_evaluate_writes_per_case_metrics(seg_run, phantom_root: Path) -> None:
    work, _ = seg_run
    out = work / "evaluation"
    bundle("run", "--config_file", f"['{cfg(SEGMENTATION, 'train.json')}','{cfg(SEGMENTATION, 'evaluate.json')}']",
           "--dataset_dir", str(phantom_root), "--ckpt_dir", str(work / "models"), "--output_dir", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    tests = sorted(json.loads((phantom_root / "splits.json").read_text())["test"])
    names = ("val_mean_dice", "val_hd95", "val_sensitivity", "val_specificity")
    assert set(names) <= set(metrics["summary"]) and set(names) <= set(metrics["per_case"])
    for name in names:
        assert sorted(metrics["per_case"][name]) == tests
        assert (out / f"{name}_raw.csv").is_file()
    for name in ("val_mean_dice", "val_sensitivity", "val_specificity"):
        values = list(metrics["per_case"][name].values())
        assert all(0.0 <= v <= 1.0 for v in values), (name, values)
    per_case_dice = list(metrics["per_case"]["val_mean_dice"].values())
    assert metrics["summary"]["val_mean_dice"] == pytest.approx(np.mean(per_case_dice), abs=1e-4)
    assert all(np.isnan(v) or v >= 0 for v in metrics["per_case"]["val_hd95"].values())


@pytest.mark.slow
def test_segmentation_inference_writes_label_maps(seg_run, phantom_root: Path, tmp_path: Path) -> None:
    work, _ = seg_run
    out = tmp_path / "labels"
    bundle("run", "--config_file", cfg(SEGMENTATION, "inference.json"), "--dataset_dir", str(phantom_root),
           "--split", "test", "--ckpt_path", str(work / "models" / "model.pt"), "--output_dir", str(out))
    tests = json.loads((phantom_root / "splits.json").read_text())["test"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}_wt.nii.gz" for c in tests)
    for case in tests:
        ref = nib.load(phantom_root / "HGG" / case / f"{case}_t1ce.nii.gz")
        pred = nib.load(out / f"{case}_wt.nii.gz")
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}


@pytest.mark.slow
def test_ckpt_export_segmentation_and_monai_label_style_inference(seg_run, phantom_root: Path, tmp_path: Path) -> None:
    """model.ts equals the eager network; and the inference config, parsed as MONAI Label parses it
    (bundle_root replaced, preprocessing / inferer / postprocessing), segments a 4D multi-channel NIfTI."""
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata
    from monai.transforms import Compose, SaveImaged

    work, _ = seg_run
    ts_path = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--config_file", cfg(SEGMENTATION, "inference.json"),
           "--meta_file", cfg(SEGMENTATION, "metadata.json"), "--ckpt_file", str(work / "models" / "model.pt"),
           "--filepath", str(ts_path))
    scripted, meta, _ = load_net_with_metadata(str(ts_path))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "tumor"

    parser = ConfigParser()
    parser.read_config(cfg(SEGMENTATION, "inference.json"))
    parser.config.update({"bundle_root": str(tmp_path)})  # what MONAI Label does
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (scripted(x) - net(x)).abs().max().item() <= TS_ATOL

    case = json.loads((phantom_root / "splits.json").read_text())["test"][0]
    folder = phantom_root / "HGG" / case
    ref = nib.load(folder / f"{case}_t1ce.nii.gz")
    stacked = np.stack([np.asarray(nib.load(folder / f"{case}_{s}.nii.gz").dataobj) for s in ("t1ce", "t2", "flair")],
                       axis=-1)
    image_path = tmp_path / f"{case}_multichannel.nii.gz"
    nib.save(nib.Nifti1Image(stacked, ref.affine), str(image_path))
    pre = parser.get_parsed_content("preprocessing")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    data = pre({"image": str(image_path)})
    assert data["image"].shape == (3, *ref.shape)
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net)[0]
    pred = post(data)["pred"]
    assert pred.shape == (1, *ref.shape) and set(torch.unique(pred).tolist()) <= {0.0, 1.0}
    assert np.allclose(np.asarray(pred.affine), ref.affine)


# -- the helpers the configs call -----------------------------------------------------------------
def test_locate_bundle_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from modalitybank.bundle import locate_bundle_root

    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file", "bundles/x/configs/train.json"])
    assert Path(locate_bundle_root()) == Path("bundles/x").resolve()
    monkeypatch.setattr(sys, "argv", ["m", "run", "--config_file=['a/configs/train.json','a/configs/evaluate.json']"])
    assert Path(locate_bundle_root()).name == "a"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert locate_bundle_root() == "."


def test_datalists(phantom_root: Path, tmp_path: Path) -> None:
    from modalitybank.bundle import brats_datalist, datalist_file, inference_cases, load_datalist
    from modalitybank.data.brats import BratsDataError

    splits = json.loads((phantom_root / "splits.json").read_text())
    at_root = phantom_root / "datalist_test.json"
    try:
        inside = brats_datalist(phantom_root, ["t2", "flair"], at_root)
        assert sorted(e["case"] for e in inside["validation"]) == sorted(splits["test"])
        first = inside["training"][0]
        assert first["image"][0].endswith("_t2.nii.gz") and not os.path.isabs(first["label"])  # relative
        loaded = load_datalist(at_root, "training")
    finally:
        at_root.unlink(missing_ok=True)
    assert all(Path(p).is_file() for e in loaded for p in [*e["image"], e["label"]])
    outside = brats_datalist(phantom_root, ["t2", "flair"], tmp_path / "dl.json")
    assert os.path.isabs(outside["training"][0]["label"])  # elsewhere: absolute
    with pytest.raises(BratsDataError, match="modality t2"):  # the LGG source set holds T1c only
        brats_datalist(phantom_root, ["t2"], sections={"all": "all"}, grades=("LGG",))

    # a synthetic set's datalist (only "training"): channels reordered into a copy, validation refused
    syn = tmp_path / "syn"
    syn.mkdir()
    entries = [{"image": [str(Path(p).resolve()) for p in e["image"]], "label": e["label"]} for e in loaded]
    (syn / "datalist.json").write_text(json.dumps({"modalities": ["t2", "flair"], "training": entries}))
    assert datalist_file(syn, ["t2", "flair"], tmp_path / "work") == str(syn / "datalist.json")
    reordered = json.loads(Path(datalist_file(syn, ["flair"], tmp_path / "work")).read_text())
    assert [e["image"] for e in reordered["training"]] == [[e["image"][1]] for e in entries]
    with pytest.raises(ValueError, match="val_dataset_dir"):
        load_datalist(syn / "datalist.json", "validation")
    with pytest.raises(ValueError, match="t1"):
        datalist_file(syn, ["t1"], tmp_path / "work")
    assert [c["image"] for c in inference_cases(syn, ["flair"])] == [[e["image"][1]] for e in entries]
    test_cases = inference_cases(phantom_root, ["t1c", "t2", "flair"], split="test")
    assert sorted(c["case"] for c in test_cases) == sorted(splits["test"])


def test_publish_generator_mirrors_the_run(tmp_path: Path) -> None:
    import shutil

    from modalitybank.bundle import publish_generator

    run, models = tmp_path / "run", tmp_path / "models"
    shutil.copytree(GENERATOR / "models", run)
    info = json.loads((run / "generator.json").read_text())
    info["data_root"] = "/somewhere/private/data"
    (run / "generator.json").write_text(json.dumps(info))
    (run / "entries" / "t1c.pt").unlink()
    (models / "entries").mkdir(parents=True)
    (models / "entries" / "t1c.pt").write_bytes(b"old")
    (models / "model_t2.pt").write_bytes(b"stale export")
    result = publish_generator(run, models)
    assert result["modalities"] == ["flair", "t2"]
    assert sorted(p.name for p in (models / "entries").iterdir()) == ["flair.pt", "t2.pt"]
    assert not (models / "model_t2.pt").exists()
    assert set(result) >= {"model"} and (models / "model.pt").is_file()  # network_def's checkpoint, rewritten
    assert not any(".entries.t1c." in k for k in torch.load(models / "model.pt", weights_only=True))
    assert json.loads((models / "generator.json").read_text())["data_root"] == "data"
