"""FedML-All: NVFlare's own FedAvg (ScatterAndGather) on the segmentation network, end to end in the
simulator on the tiny phantom (jobs/fedavg_segmentation, 2 rounds, few local steps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalitybank.fl.jobs import export_job
from modalitybank.fl.policy import admit_package
from modalitybank.fl.segmentation import FedSegmentationNet, experiment_modalities, site_inputs
from modalitybank.networks import segmentation_network

NVFLARE = [sys.executable, "-m", "nvflare.cli"]
SITES = ("site-1", "site-2", "site-3")


def _dice_ok(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_missing_modality_channels_are_zero() -> None:
    assert experiment_modalities("multimodal") == ["t1", "t2", "flair"]
    assert experiment_modalities("missing_modality") == ["t1c", "t2", "flair"]
    images = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 2.0)], dim=1)  # t1c, flair
    out = site_inputs(images, ["t1c", "flair"], ["t1c", "t2", "flair"])
    assert out.shape == (2, 3, 4, 4)
    assert (out[:, 0] == 1).all() and (out[:, 1] == 0).all() and (out[:, 2] == 2).all()
    # the server's global model has the state dict of the package's segmentation network
    segmentation_network(in_channels=3, out_channels=2).load_state_dict(FedSegmentationNet("missing_modality").state_dict())


@pytest.mark.slow
def test_fedavg_segmentation_simulator(tmp_path: Path, phantom_root: Path, cache_dir: Path) -> None:
    job = export_job("fedavg_segmentation", tmp_path / "job", rounds=2, scale="tiny", data_root=str(phantom_root),
                     cache_dir=str(cache_dir), local_steps=3)
    ws = tmp_path / "ws"
    admit_package(ws / "local")  # the simulated sites' allow-list
    proc = subprocess.run([*NVFLARE, "simulator", str(job), "-w", str(ws), "-n", "3", "-t", "3"],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    # the final global model, persisted by NVFlare's PTFileModelPersistor, loads into our network
    model_file = ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    assert model_file.is_file(), output[-4000:]
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    net = segmentation_network(in_channels=3, out_channels=2)
    net.load_state_dict(saved["model"])

    # every site trained both rounds and logged its test Dice
    for site in SITES:
        log = (ws / site / "log.txt").read_text()
        for r in (0, 1):
            assert f"round {r}: site {site}" in log, f"{site} did not log round {r}"
        lines = [json.loads(x) for x in (ws / site / "simulate_job" / "fedavg_metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [0, 1]
        assert all(x["steps"] == 3 and _dice_ok(x["dice_global"]) and _dice_ok(x["dice_local"]) for x in lines), lines

    # the server's per-round lines name all three sites; the final model was evaluated on the test split
    rounds = [json.loads(x) for x in (ws / "server" / "simulate_job" / "fedavg_rounds.jsonl").read_text().splitlines()]
    per_round = [x for x in rounds if x["round"] != "final"]
    assert [x["round"] for x in per_round] == [0, 1]
    assert all(sorted(x["sites"]) == list(SITES) and _dice_ok(x["dice_local"]) for x in per_round), per_round
    final = {x["model"]: x for x in rounds if x["round"] == "final"}
    assert "SRV_FL_global_model.pt" in final, rounds
    assert sorted(final["SRV_FL_global_model.pt"]["sites"]) == list(SITES)
    assert _dice_ok(final["SRV_FL_global_model.pt"]["dice"])
    cross_val = json.loads((ws / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").read_text())
    assert all(_dice_ok(cross_val[s]["SRV_FL_global_model.pt"]["val_dice"]) for s in SITES), cross_val
