"""Federated ModalityBank in the real NVFlare simulator (3 sites, tiny phantom, a few iterations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_site import FaultySiteExecutor

from modalitybank import dp
from modalitybank.fl.jobs import simulate
from modalitybank.fl.site_config import ENV_VAR
from modalitybank.store import load_generator

pytestmark = pytest.mark.slow

DECLARED = {"grad/t1", "grad/t1c", "grad/t2", "grad/flair", "next_masks", "losses", "modalities", "slices", "privacy"}


def _run(job: str, workdir: Path, phantom_root: Path, cache_dir: Path, pretrained: Path, rounds: int, **kw) -> dict:
    return simulate(job, workdir, scale="tiny", rounds=rounds, progress=False, data_root=str(phantom_root),
                    cache_dir=str(cache_dir), pretrained=str(pretrained), **kw)


def _ledger(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_multimodal_job(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    result = _run("modalitybank_multimodal", tmp_path, phantom_root, cache_dir, pretrained, rounds=3)
    assert result["rounds"] == 3 and result["sites"] == ["site-1", "site-2", "site-3"]
    gen = load_generator(result["checkpoint"])
    assert sorted(gen.bank.modalities) == ["flair", "t1", "t2"]
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(np.isfinite(list(m["mean"].values())).all() for m in metrics)
    assert {k.split("/")[0] for k in metrics[-1]["losses"]} == {"site-1", "site-2", "site-3"}
    site_ledgers = [p for p in result["ledgers"] if "/server/" not in p]
    assert len(site_ledgers) == 3
    for path in site_ledgers:
        sent = [e for e in _ledger(path) if e["direction"] == "sent"]
        assert sent and {e["key"] for e in sent} <= DECLARED and all(e["status"] == "passed" for e in sent)
        received = {e["key"] for e in _ledger(path) if e["direction"] == "received" and e["key"]}
        assert received == {"fake/t1", "fake/t2", "fake/flair"}  # the server sends synthetic images only


def test_missing_modality_job_guards_faults_and_resumes(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    faults = {"site-2": {"leak_real": True}, "site-3": {"nan_from": 1}, "site-1": {"huge_from": 2}}
    result = _run("modalitybank_missing_modality", tmp_path, phantom_root, cache_dir, pretrained, rounds=3,
                  site_executor=FaultySiteExecutor, faults=faults)
    log = Path(result["log"]).read_text()
    # an executor returning a real image is blocked by its site's guard, and the server names the site
    site2 = _ledger(next(p for p in result["ledgers"] if "/site-2/" in p))
    blocked = [e for e in site2 if e["status"] == "blocked"]
    assert blocked and all("real/t1c" in e["note"] for e in blocked)
    assert not any(e["key"] == "real/t1c" and e["status"] == "passed" for e in site2)
    assert "site site-2 at iteration" in log and "undeclared keys ['real/t1c']" in log
    # NaN gradients are blocked at the site; oversized ones rejected by the server; both named
    assert "site site-3 at iteration" in log and "non-finite" in log
    assert "site site-1 at iteration 3: rejected" in log and "exceeds the limit" in log
    # what the run reports is what it trained: iterations 1 and 2 had accepted gradients (site-1's
    # from iteration 3 on are rejected, site-3 is blocked from iteration 2, site-2 every time)
    assert result["rounds"] == 2 and result["sites"] == ["site-1", "site-3"]
    # arrays travel inside the messages (job.INLINE_ARRAYS): no download transaction, whose race ended a CI run
    assert "set transaction info" not in log

    resumed = _run("modalitybank_missing_modality", tmp_path, phantom_root, cache_dir, pretrained, rounds=5,
                   wire_dtype="float16")
    assert resumed["rounds"] == 4  # + iterations 4 and 5
    grads = [e for e in _ledger(next(p for p in resumed["ledgers"] if "/site-1/" in p)) if e["key"] == "grad/t1c"]
    assert grads and all(e["dtype"] == "float16" and e["bytes"] == 8 * 64 * 64 * 2 for e in grads)
    log = Path(resumed["log"]).read_text()
    assert "resumed from the checkpoint" in log
    # the sites' discriminators continue too: the simulator wipes its workspace, their state lives beside it
    assert log.count("resumed discriminators from") == 3
    assert sorted(p.parts[-4] for p in (tmp_path / "sites").glob("*/modalitybank/*/discriminators.pt")) == \
        ["site-1", "site-2", "site-3"]
    gen = load_generator(resumed["checkpoint"])
    assert sorted(gen.bank.modalities) == ["flair", "t1c", "t2"]
    before = torch.load(Path(pretrained) / "base.pt", weights_only=True)["state"]
    after = torch.load(Path(resumed["checkpoint"]) / "base.pt", weights_only=True)["state"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stayed frozen


def test_site_that_stops_answering_is_set_aside_and_taken_back(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    result = _run("modalitybank_multimodal", tmp_path, phantom_root, cache_dir, pretrained, rounds=14,
                  site_timeout=3, site_executor=FaultySiteExecutor,
                  faults={"site-3": {"hang_at": 1, "hang_seconds": 6}})
    log = Path(result["log"]).read_text()
    assert "site site-3 at iteration 2: no answer in time" in log
    assert "site site-3 is back" in log
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert result["rounds"] == 14 and any("site-3/t1" in m["losses"] for m in metrics[3:])


def _worker_pid(workspace: Path, site: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "simulator_worker" in cmd and f"{workspace}/{site} " in cmd + " ":
                return int(proc.name)
    return None


def test_site_killed_mid_training_is_named_and_the_run_goes_on(phantom_root, cache_dir, pretrained, tmp_path) -> None:
    """kill -9 of a site's process in the middle of training: the server says so and finishes with the others."""
    import os
    import signal
    import threading
    import time

    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(_run(
        "modalitybank_multimodal", tmp_path, phantom_root, cache_dir, pretrained, rounds=30, site_timeout=5)))
    runner.start()
    log = tmp_path / "simulator.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "iteration 5/30" in log.read_text()):
        time.sleep(0.5)
    pid = _worker_pid(tmp_path / "workspace", "site-3")
    assert pid is not None, "site-3's simulator process not found"
    os.kill(pid, signal.SIGKILL)
    runner.join(timeout=600)
    text = log.read_text()
    assert out["rounds"] == 30
    assert "site site-3 at iteration" in text and "no answer in time; going on with ['site-1', 'site-2']" in text
    metrics = [json.loads(line) for line in (Path(out["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert "site-3/t1" not in metrics[-1]["losses"] and "site-1/t1" in metrics[-1]["losses"]


def test_privacy_modes_chosen_by_each_site_and_a_spent_budget(phantom_root, cache_dir, pretrained, tmp_path,
                                                               monkeypatch) -> None:
    """site-1 in dp with a budget for 2 steps, site-2 adversarial, site-3 standard (the job's fallback)."""
    sigma, batch, modalities = 40.0, 8, 3  # multimodal: every site holds t1, t2, flair
    z = sigma / (2 * (batch * modalities) ** 0.5)
    budget = (dp.epsilon(z, 1.0, 2, 1e-5) + dp.epsilon(z, 1.0, 3, 1e-5)) / 2  # 2 steps fit, 3 do not
    settings = {"sites": {"site-1": {"privacy": {"mode": "dp", "epsilon": budget, "delta": 1e-5, "clip": 0.1,
                                                 "noise_multiplier": sigma}},
                          "site-2": {"privacy": {"mode": "adversarial"}}}}
    (tmp_path / "site.json").write_text(json.dumps(settings))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "site.json"))  # the simulated sites' own settings
    result = _run("modalitybank_multimodal", tmp_path, phantom_root, cache_dir, pretrained, rounds=5)
    log = Path(result["log"]).read_text()
    assert "site site-1 stops contributing: privacy budget spent: 2 steps released" in log
    assert "site site-1 has spent its privacy budget at iteration 3" in log
    assert result["rounds"] == 5 and result["sites"] == ["site-1", "site-2", "site-3"]
    ledgers = {site: _ledger(next(p for p in result["ledgers"] if f"/{site}/" in p)) for site in ("site-1", "site-2")}
    sent_grads = [e for e in ledgers["site-1"] if e["direction"] == "sent" and (e["key"] or "").startswith("grad/")]
    assert len(sent_grads) == 2 * modalities and all(e["privacy_mode"] == "dp" for e in sent_grads)
    assert max(e["epsilon_spent"] for e in sent_grads) <= budget
    assert any(e["status"] == "error" and e["note"].endswith("privacy_budget_spent") for e in ledgers["site-1"])
    assert all(e.get("privacy_mode") == "adversarial" for e in ledgers["site-2"] if e["direction"] == "sent")
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["losses"]["site-1/t1"] == {}  # dp: no loss computed on real images leaves
    assert set(metrics[0]["losses"]["site-2/t1"]) == {"d", "g_adv"}  # adversarial: no L1 loss
    assert "g_l1" in metrics[0]["losses"]["site-3/t1"] and "site-1/t1" not in metrics[-1]["losses"]
