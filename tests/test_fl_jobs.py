"""The job folders as committed: made by flare_app/job.py, run verbatim by NVFlare's own CLI, fail loudly."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from modalitybank.fl.jobs import app, export_job, read_run
from modalitybank.fl.policy import JOB_NVFLARE_CLASSES, PACKAGE_PREFIX, admit_package
from modalitybank.fl.rejoin import COMPONENT_ID, SiteRejoin, add_to_server_kit
from modalitybank.resources import shared_dir

REPO = Path(__file__).resolve().parents[1]
NVFLARE = [sys.executable, "-m", "nvflare.cli"]


def _sorted_tasks(node: object) -> object:
    """``tasks`` lists sorted: the Job API writes a filter's tasks from a set, in no fixed order."""
    if isinstance(node, dict):
        return {k: sorted(v) if k == "tasks" else _sorted_tasks(v) for k, v in node.items()}
    return [_sorted_tasks(v) for v in node] if isinstance(node, list) else node


def _tree(root: Path) -> dict[str, object]:
    """Every file below ``root``: JSON parsed (key order, layout and task order do not matter), others as bytes."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(root))
            out[rel] = _sorted_tasks(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return out


def test_committed_jobs_are_what_the_app_makes(tmp_path) -> None:
    """jobs/ is flare_app/job.py's export: change the app, re-export (`python flare_app/job.py --export jobs`)."""
    made = app().export_jobs(tmp_path)
    assert sorted(p.name for p in made) == sorted(app().JOBS)
    for path in made:
        committed = shared_dir("jobs") / path.name
        assert _tree(path) == _tree(committed), f"jobs/{path.name} differs from what flare_app/job.py makes"


def test_committed_jobs_hold_configuration_only() -> None:
    for name in app().JOBS:
        job = shared_dir("jobs") / name
        assert not [p for p in job.rglob("*") if p.is_symlink()]
        assert not (job / "app" / "custom").exists()  # no BYOC: the sites' installed package runs
        configs = [json.loads(p.read_text()) for p in job.rglob("config_fed_*.json")]
        paths = re.findall(r'"path": "([^"]+)"', json.dumps(configs))
        assert paths and all(p.startswith(("nvflare.", PACKAGE_PREFIX)) for p in paths)


def test_job_with_code_carries_the_runtime_only(tmp_path) -> None:
    job = export_job("modalitybank_missing_modality", tmp_path / "job", with_code=True, scale="small", rounds=7)
    custom = job / "app" / "custom"
    modules = {str(p.relative_to(custom / "modalitybank")) for p in (custom / "modalitybank").rglob("*.py")}
    runtime = {"layers.py", "norm.py", "bank.py", "networks.py", "gan.py", "fl/wire.py", "fl/privacy.py", "fl/executor.py",
               "fl/controller.py", "fl/ledger.py", "fl/site_config.py", "dp.py", "data/brats.py", "data/brats_cases.py", "data/slices.py"}
    assert runtime <= modules
    assert not modules & {"fl/deploy.py", "fl/jobs.py", "bench.py", "cli.py", "data/phantom.py", "data/anatomy.py",
                          "data/default.py", "fl/segmentation.py"}
    assert (custom / "modalitybank" / "configs" / "presets.json").is_file()
    assert (custom / "site_discriminator" / "configs" / "train.json").is_file()
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["executors"][0]
    assert server["scale"] == "small" and server["iterations"] == 7 and server["experiment"] == "missing_modality"
    assert client["executor"]["args"]["scale"] == "small" and "iterations" not in client["executor"]["args"]


def test_fedavg_job_with_code_carries_the_segmentation_bundle(tmp_path) -> None:
    job = export_job("fedavg_segmentation", tmp_path / "job", with_code=True, rounds=3, local_iterations=4)
    custom = job / "app" / "custom"
    modules = {str(p.relative_to(custom / "modalitybank")) for p in (custom / "modalitybank").rglob("*.py")}
    runtime = {"fl/segmentation.py", "fl/executor.py", "fl/site_config.py", "bundle/segmentation.py",
               "bundle/seg_transforms.py", "data/brats.py", "data/brats_cases.py", "resources.py", "config.py"}
    assert runtime <= modules
    # no bundle/__init__ (it imports every bundle's helpers): train.json's load_datalist is reached directly
    assert not modules & {"fl/jobs.py", "bench.py", "cli.py", "data/phantom.py", "data/default.py", "bundle/__init__.py"}
    carried = {str(p.relative_to(custom / "tumor_segmentation")) for p in (custom / "tumor_segmentation").rglob("*")}
    assert {"configs/train.json", "configs/evaluate.json", "configs/metadata.json"} <= carried
    assert not [p for p in carried if p.startswith("models")]  # not the demo weights
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["executors"][0]
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    assert client["executor"]["args"]["local_iterations"] == 4


@pytest.mark.parametrize("name", ["modalitybank_multimodal", "fedavg_segmentation"])
def test_poll_interval_sets_the_server_and_the_sites(tmp_path, name) -> None:
    """How often an idle site asks for work: the server's task_request_interval (which it tells the sites)
    and the sites' first fetch interval, from one job argument; the committed jobs hold the default."""
    job = export_job(name, tmp_path / "job", poll_interval=0.3)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert server["server"]["task_request_interval"] == 0.3 and client["default_task_fetch_interval"] == 0.3
    committed = json.loads((shared_dir("jobs") / name / "app" / "config" / "config_fed_server.json").read_text())
    assert committed["server"]["task_request_interval"] == app().POLL_INTERVAL
    with pytest.raises(ValueError, match="poll_interval must be > 0"):
        export_job(name, tmp_path / "bad", poll_interval=0)


def test_unknown_job_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown arguments \\['data_rot'\\]"):
        export_job("modalitybank_multimodal", tmp_path / "job", data_rot="/x")


def test_simulator_workspace_admits_every_class_of_the_jobs(tmp_path) -> None:
    """The committed simulator workspace holds the sites' allow-list as admit_package writes it, and it
    admits every class the jobs name (NVFlare's own default list lacks some)."""
    committed = json.loads((REPO / "workspace" / "local" / "resources.json").read_text())
    assert committed == json.loads(admit_package(tmp_path).read_text())
    allow = committed["class_allow_list"]
    for config in shared_dir("jobs").rglob("config_fed_*.json"):
        for path in re.findall(r'"path": "([^"]+)"', config.read_text()):
            assert path in allow or any(path.startswith(p) for p in allow if p.endswith(".")), f"{config}: {path}"


def test_admit_package_keeps_the_site_list(tmp_path) -> None:
    (tmp_path / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": ["a.b"],
                                                                 "components": []}))
    written = json.loads(admit_package(tmp_path).read_text())
    assert written == {"format_version": 2, "class_allow_list": ["a.b", *JOB_NVFLARE_CLASSES, PACKAGE_PREFIX],
                       "components": []}


def test_server_kit_gets_the_rejoin_component_once_and_keeps_the_rest(tmp_path) -> None:
    """The server's parent process builds the component from the class path written (importable, a SiteRejoin)."""
    import importlib

    system = [{"id": "job_manager", "path": "nvflare.apis.impl.job_def_manager.SimpleJobDefManager", "args": {}}]
    (tmp_path / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": system}))
    admit_package(tmp_path)
    add_to_server_kit(tmp_path, check_interval=1.5)
    written = json.loads(add_to_server_kit(tmp_path, check_interval=1.5).read_text())  # twice: still one entry
    assert written["components"][:-1] == system and PACKAGE_PREFIX in written["class_allow_list"]
    rejoin = written["components"][-1]
    assert [c["id"] for c in written["components"]].count(COMPONENT_ID) == 1 and rejoin["id"] == COMPONENT_ID
    module, name = rejoin["path"].rsplit(".", 1)
    component = getattr(importlib.import_module(module), name)(**rejoin["args"])
    assert isinstance(component, SiteRejoin) and component.check_interval == 1.5


def _readme_line(prefix: str) -> str:
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.strip().startswith(prefix)]
    assert lines, f"the README has no line starting with {prefix!r}"
    return lines[0]


@pytest.mark.slow
@pytest.mark.long
def test_readme_simulator_line_runs_verbatim() -> None:
    """The README's `nvflare simulator jobs/modalitybank_multimodal ...`, as written, from the repository root."""
    line = _readme_line("nvflare simulator jobs/modalitybank_multimodal")
    workspace = REPO / shlex.split(line)[shlex.split(line).index("-w") + 1]
    done = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for site in ("site-1", "site-2", "site-3"):
        assert f"site {site} joined" in log
    checkpoint = workspace / "server" / "simulate_job" / "checkpoint"
    assert sorted(p.stem for p in (checkpoint / "entries").glob("*.pt")) == ["flair", "t1", "t2"]
    run = read_run(checkpoint)
    assert run["status"] == "completed" and run["sites"] == ["site-1", "site-2", "site-3"]
    assert run["accepted_iterations"] == run["iterations"] > 0


@pytest.mark.slow
def test_no_site_can_join_fails_with_the_reasons(tmp_path) -> None:
    missing = tmp_path / "no-such-brats"
    # our command
    done = subprocess.run([sys.executable, "-m", "modalitybank.cli", "fl", "simulate", "modalitybank_multimodal",
                           "--data", str(missing), "--rounds", "2", "--workdir", str(tmp_path / "ours"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and '"rounds"' not in done.stdout
    run = read_run(tmp_path / "ours" / "checkpoint")
    assert run["status"] == "failed"
    for site in ("site-1", "site-2", "site-3"):  # the server names each site and its error code, no more
        assert f"{site}: EXECUTION_EXCEPTION: data_error" in done.stderr
        assert f"{site}: EXECUTION_EXCEPTION: data_error" in run["reason"] and str(missing) not in run["reason"]
        # the detail stays in the site's own log; the reply that left is in its ledger, with the code only
        site_log = (tmp_path / "ours" / "workspace" / site / "log.txt").read_text()
        assert f"{missing}: data root does not exist" in site_log and "(data_error)" in site_log
        ledger = [json.loads(line) for p in (tmp_path / "ours" / "workspace" / site).rglob("modalitybank_ledger.jsonl")
                  for line in p.read_text().splitlines()]
        assert any(e["status"] == "error" and e["note"] == "EXECUTION_EXCEPTION: data_error" for e in ledger)
        assert not any(str(missing) in json.dumps(e) for e in ledger)
    # NVFlare's own simulator on the same job
    job = export_job("modalitybank_multimodal", tmp_path / "job", data_root=str(missing), rounds=2)
    workspace = tmp_path / "ws"
    admit_package(workspace / "local")
    done = subprocess.run([*NVFLARE, "simulator", str(job), "-w", str(workspace), "-n", "2", "-t", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "run failed: 0 of 2 sites joined" in done.stdout + done.stderr
    assert "site site-2 could not join: EXECUTION_EXCEPTION: data_error" in done.stdout + done.stderr


@pytest.mark.slow
def test_installed_package_runs_outside_the_repository(tmp_path, phantom_root, cache_dir, pretrained) -> None:
    """`pip install .` (not editable) into a fresh virtual environment; the command runs from elsewhere."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(REPO)],
                   check=True, timeout=600, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import modalitybank, modalitybank.resources as r; "
                            "print(modalitybank.__file__); print(r.bundle_dir('site_discriminator'))"],
                           capture_output=True, text=True, check=True, cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the source tree
    done = subprocess.run([str(venv / "bin" / "modalitybank"), "fl", "simulate", "modalitybank_multimodal",
                           "--rounds", "2", "--workdir", "run", "--data", str(phantom_root), "--cache-dir",
                           str(cache_dir), "--pretrained", str(pretrained), "--json"], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["sites"] == ["site-1", "site-2", "site-3"]
    sites_code = (elsewhere / "run" / "workspace" / "site-1" / "log.txt").read_text()
    assert f"code from {venv}" in sites_code
