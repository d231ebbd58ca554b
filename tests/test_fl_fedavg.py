"""FedML-All: NVFlare's own FedAvg (ScatterAndGather) on the segmentation network, end to end in the
simulator on the tiny phantom (jobs/fedavg_segmentation, 2 rounds, few local steps)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalitybank.fl.segmentation import FedSegmentationNet, experiment_modalities, site_inputs
from modalitybank.networks import segmentation_network

JOB = Path(__file__).resolve().parents[1] / "jobs" / "fedavg_segmentation"
SITES = ("site-1", "site-2", "site-3")


def _nvflare() -> list[str]:
    script = Path(sys.executable).parent / "nvflare"
    if script.is_file():
        return [str(script)]
    found = shutil.which("nvflare")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from nvflare.cli import main; sys.exit(main())"]


def _edit(path: Path, edit) -> None:
    conf = json.loads(path.read_text())
    edit(conf)
    path.write_text(json.dumps(conf, indent=2))


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
    job = tmp_path / "job"
    shutil.copytree(JOB, job, symlinks=False)  # carries the package itself as the job's custom code

    def server(conf: dict) -> None:
        conf["workflows"][0]["args"]["num_rounds"] = 2

    def client(conf: dict) -> None:
        conf["executors"][0]["executor"]["args"].update(
            scale="tiny", data_root=str(phantom_root), cache_dir=str(cache_dir), local_steps=3)

    _edit(job / "app" / "config" / "config_fed_server.json", server)
    _edit(job / "app" / "config" / "config_fed_client.json", client)

    ws = tmp_path / "ws"
    proc = subprocess.run([*_nvflare(), "simulator", str(job), "-w", str(ws), "-n", "3", "-t", "3"],
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
