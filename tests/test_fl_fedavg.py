"""FedML-All: the segmentation bundle trained inside NVFlare (FedAvg: ScatterAndGather on the server,
MonaiAlgo on each site), end to end in the simulator on the tiny phantom, and its final global model
evaluated by the bundle's own evaluate.json."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalitybank.fl.jobs import app
from modalitybank.fl.segmentation import (
    BundleNetwork,
    FedAvgSegmentationExecutor,
    bundle_network,
    experiment_modalities,
    run_fedavg,
)
from modalitybank.resources import bundle_dir

SITES = ("site-1", "site-2", "site-3")
#: missing_modality: channels t1c, t2, flair; CBICA lacks t2, TCIA flair, Other t1c
BLANKED = {"site-1": [1], "site-2": [2], "site-3": [0]}


def test_global_model_is_the_bundle_network() -> None:
    assert experiment_modalities("multimodal") == ["t1", "t2", "flair"]
    assert experiment_modalities("missing_modality") == ["t1c", "t2", "flair"]
    for experiment in ("multimodal", "missing_modality"):
        server = BundleNetwork(experiment)
        bundle = bundle_network(experiment_modalities(experiment))
        assert list(server.state_dict()) == list(bundle.state_dict())
        bundle.load_state_dict(server.state_dict())  # strict: same keys, same shapes
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(server.eval()(x), bundle.eval()(x))


def test_job_budget_and_no_test_set_validation(tmp_path: Path) -> None:
    job = app().make_job("fedavg_segmentation_missing_modality", rounds=4, local_iterations=7, learning_rate=5e-4)
    job.export_job(str(tmp_path))
    config = tmp_path / "fedavg_segmentation_missing_modality" / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())["executors"][0]
    assert server["workflows"][0]["args"]["num_rounds"] == 4
    assert server["components"][0]["args"]["model"] == {"path": "modalitybank.fl.segmentation.BundleNetwork",
                                                        "args": {"experiment": "missing_modality"}}
    assert not [c for c in server["components"] if "selector" in c["path"].lower()]  # the last model is the result
    assert client["tasks"] == ["train"]
    args = client["executor"]["args"]
    assert args["local_iterations"] == 7 and args["learning_rate"] == 5e-4 and args["experiment"] == "missing_modality"

    executor = FedAvgSegmentationExecutor(local_iterations=7, patch_size=[48, 48], batch_size=1)
    executor.site = "site-1"
    bundle = bundle_dir("tumor_segmentation")
    overrides = executor.bundle_overrides(tmp_path / "d.json", tmp_path, tmp_path / "out", bundle)
    assert overrides["epoch_length"] == 7 and overrides["train#handlers"] == []  # no ValidationHandler
    assert overrides["patch_size"] == [48, 48] and overrides["train#dataloader#batch_size"] == 1
    with pytest.raises(ValueError, match="local_iterations"):
        FedAvgSegmentationExecutor(local_iterations=0)


@pytest.mark.slow
def test_fedavg_segmentation_simulator(tmp_path: Path, phantom_root: Path) -> None:
    rounds, iterations = 2, 3
    result = run_fedavg(tmp_path / "run", experiment="missing_modality", data_root=phantom_root, num_rounds=rounds,
                        local_iterations=iterations, patch_size=[48, 48], num_samples=2)
    assert result["sites"] == list(SITES) and result["rounds"] == rounds
    assert result["iterations"] == {s: rounds * iterations for s in SITES}
    workspace = Path(result["workspace"])

    # every site trained every round for exactly `iterations`, on its own cases, its missing channel blanked
    for site in SITES:
        log = (workspace / site / "log.txt").read_text()
        for r in range(rounds):
            assert f"round {r}: site {site} " in log and f"{iterations} iterations" in log
        lines = [json.loads(x) for x in (workspace / site / "simulate_job" / "fedavg_metrics.jsonl").read_text()
                 .splitlines()]
        assert [x["round"] for x in lines] == list(range(rounds))
        assert [x["iterations"] for x in lines] == [iterations] * rounds
        assert [x["total_iterations"] for x in lines] == [iterations * (r + 1) for r in range(rounds)]
        assert all(math.isfinite(x["train_loss"]) for x in lines), lines
        datalist = json.loads((workspace / site / "simulate_job" / f"datalist_{site}.json").read_text())
        assert datalist["modalities"] == ["t1c", "t2", "flair"] and "validation" not in datalist
        assert datalist["training"] and all(e["missing"] == BLANKED[site] for e in datalist["training"])
        assert {e["centre"] for e in datalist["training"]} == {lines[0]["centre"]}

    # the final global model is the bundle's network, and the bundle's evaluate.json takes it
    model = Path(result["model"])
    saved = torch.load(model, map_location="cpu", weights_only=True)
    bundle_network(["t1c", "t2", "flair"]).load_state_dict(saved["model"])
    models = tmp_path / "eval" / "models"
    models.mkdir(parents=True)
    shutil.copyfile(model, models / "model.pt")
    configs = bundle_dir("tumor_segmentation") / "configs"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str([str(configs / "train.json"), str(configs / "evaluate.json")]),
         "--bundle_root", str(configs.parent), "--dataset_dir", str(phantom_root),
         "--modalities", "['t1c','t2','flair']", "--ckpt_dir", str(models),
         "--output_dir", str(tmp_path / "eval" / "out"), "--patch_size", "[48,48]"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((tmp_path / "eval" / "out" / "metrics.json").read_text())
    dice = metrics["summary"]["val_mean_dice"]
    assert isinstance(dice, float) and math.isfinite(dice) and 0.0 <= dice <= 1.0, metrics["summary"]
    assert len(metrics["per_case"]["val_mean_dice"]) == 2  # the phantom's test split
