"""Real federations on localhost: POC, provisioned with mutual TLS, and a kit of another CA refused.

Each test starts real NVFlare server and client processes (ports on 127.0.0.1, free ones if the
project file's are taken) and stops them itself, on failure too.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modalitybank import config
from modalitybank.data.sites import split_sites
from modalitybank.fl import wire
from modalitybank.fl.deploy import SERVER, SITES, drop_unsubmittable, run_poc, run_provisioned
from modalitybank.fl.jobs import simulate
from modalitybank.fl.policy import PACKAGE_PREFIX
from modalitybank.fl.processes import cli_env, crash
from modalitybank.fl.trust import foreign_ca_check
from modalitybank.resources import shared_dir
from modalitybank.store import load_generator

pytestmark = [pytest.mark.slow, pytest.mark.deploy]


def _check(result: dict, workdir: Path, rounds: int) -> None:
    assert result["rounds"] == rounds and result["sites"] == list(SITES)
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_relative_to(workdir / "result")  # downloaded with the job's result
    assert sorted(load_generator(checkpoint).bank.modalities) == ["flair", "t1", "t2"]
    assert sorted(p.stem for p in (checkpoint / "entries").glob("*.pt")) == ["flair", "t1", "t2"]
    server_ledger = Path(result["ledgers"][0])
    assert server_ledger.is_relative_to(workdir / "result") and len(result["ledgers"]) == 1 + len(SITES)
    entries = [json.loads(line) for line in server_ledger.read_text().splitlines()]
    assert {e["site"] for e in entries} == set(SITES) and max(e["iteration"] for e in entries) == rounds - 1
    # the server and the sites listen on loopback only
    assert result["listening"] and all(s["address"] == "127.0.0.1" for s in result["listening"])


@pytest.mark.long
def test_poc_job_as_committed_on_sites_with_the_package(tmp_path) -> None:
    """`nvflare job submit` of jobs/modalitybank_missing_modality as committed: configuration only, BYOC off at
    every site, the sites' allow-list admitting the installed package."""
    job = shared_dir("jobs") / "modalitybank_missing_modality"
    result = run_poc(tmp_path, job, progress=False)
    iterations = config.preset("tiny")["train"]["bank_iterations"]
    assert result["rounds"] == iterations and result["sites"] == list(SITES)
    assert sorted(load_generator(result["checkpoint"]).bank.modalities) == ["flair", "t1c", "t2"]
    assert result["job_dir"] == str(job) and not (job / "app" / "custom").exists()  # submitted as committed
    for kit in (tmp_path / "poc").rglob("hospital-*"):
        if (kit / "local").is_dir():
            policy = json.loads((kit / "local" / "authorization.json").read_text())
            assert policy["permissions"]["project_admin"]["byoc"] == "none"
            assert PACKAGE_PREFIX in json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]


def test_poc_job_carrying_its_code_on_sites_without_the_package(phantom_root, pretrained, tmp_path,
                                                                  monkeypatch) -> None:
    """The same job with its code in custom/, on sites where the package cannot be imported (hidden from sys.path
    in every NVFlare process): the sites run the carried code."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "without_package"))
    result = run_poc(tmp_path, "modalitybank_missing_modality", scale="tiny", rounds=3, progress=False,
                     with_code=True, data_root=str(phantom_root), pretrained=str(pretrained))
    assert result["rounds"] == 3 and result["sites"] == list(SITES)
    for site in SITES:
        log = next((tmp_path / "poc").rglob(f"{site}/{result['job_id']}/log.txt")).read_text()
        carried = re.search(r"code from (\S+)", log)
        assert carried and f"/{result['job_id']}/" in carried.group(1) and "/custom/" in carried.group(1)


def test_poc_job_in_which_no_site_joins_fails_with_the_reasons(pretrained, tmp_path) -> None:
    missing = tmp_path / "no-such-brats"
    with pytest.raises(RuntimeError, match="FINISHED:EXECUTION_EXCEPTION") as failed:
        run_poc(tmp_path, "modalitybank_multimodal", rounds=2, progress=False, data_root=str(missing),
                pretrained=str(pretrained))
    assert "0 of 3 sites joined" in str(failed.value)  # the reason, from the run.json of the downloaded job
    # the server names each site and its error code; the detail (the path) stays in the site's own log
    assert "hospital-a: EXECUTION_EXCEPTION: data_error" in str(failed.value)


def _entry_hashes(folder: Path) -> dict[str, str]:
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "entries").glob("*.pt")}


@pytest.mark.long
def test_poc_modality_that_joins_later_with_each_site_reading_its_own_folder(phantom_root, cache_dir, pretrained,
                                                                              tmp_path) -> None:
    """`modalitybank fl poc --resume-from --add-modality t1 --site-config`: the bank of a finished T1c + T2 + FLAIR
    run gets a T1 entry from the hospitals that scanned T1 (each reading its own folder from its kit's local/);
    the existing entries stay bit-identical, a hospital without T1 gets no fakes."""
    first = simulate("modalitybank_missing_modality", tmp_path / "first", scale="tiny", rounds=2, progress=False,
                     data_root=str(phantom_root), cache_dir=str(cache_dir), pretrained=str(pretrained))
    before = _entry_hashes(Path(first["checkpoint"]))
    folders = split_sites(phantom_root, tmp_path / "sites", list(SITES), grades=("HGG",))
    no_t1 = SITES[-1]
    for case in folders[no_t1].glob("*/*"):  # this hospital never scanned T1
        target = case.resolve()
        case.unlink()
        shutil.copytree(target, case, ignore=shutil.ignore_patterns("*_t1.nii.gz"))
    site_config = json.loads((tmp_path / "sites" / "modalitybank_site.json").read_text())
    site_config["default"] = {"cache_dir": str(cache_dir)}
    (tmp_path / "site_config.json").write_text(json.dumps(site_config))

    proc = subprocess.run(["modalitybank", "fl", "poc", "--workdir", str(tmp_path / "poc-run"), "--job",
                           "modalitybank_multimodal", "--scale", "tiny", "--rounds", "2", "--resume-from",
                           first["checkpoint"], "--add-modality", "t1", "--site-config",
                           str(tmp_path / "site_config.json"), "--quiet", "--json"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with_t1 = [s for s in SITES if s != no_t1]
    assert result["rounds"] == 2 and result["sites"] == with_t1
    after = _entry_hashes(Path(result["checkpoint"]))
    assert sorted(after) == ["flair", "t1", "t1c", "t2"] and all(after[m] == before[m] for m in before)
    sent = [json.loads(line) for line in Path(result["ledgers"][0]).read_text().splitlines()]  # the server's
    assert {(e["site"], e["key"]) for e in sent if e["direction"] == "sent" and e["key"]} == \
        {(s, "fake/t1") for s in with_t1}
    for site in SITES:  # each site read its own folder, named in its log
        log = next((tmp_path / "poc-run" / "poc").rglob(f"{site}/{result['job_id']}/log.txt")).read_text()
        assert str(folders[site]) in log


def _wait_for(path_glob: Callable[[], list[Path]], pattern: str, timeout: float) -> Path:
    """The first file of ``path_glob()`` whose text matches ``pattern`` within ``timeout`` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        for path in path_glob():
            if re.search(pattern, path.read_text(errors="replace")):
                return path
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in {path_glob()} after {timeout:.0f} s")


@pytest.mark.long
@pytest.mark.parametrize("folder_lost", [False, True], ids=["crash", "crash-and-job-folder-lost"])
def test_poc_site_killed_mid_job_and_started_again_rejoins_the_running_job(phantom_root, cache_dir, pretrained,
                                                                            tmp_path, folder_lost) -> None:
    """kill -9 of every process of hospital-c (its client and its job process) in the middle of a job, then its
    kit's ``startup/start.sh``: the server starts the running job on it again, and the site's new job process
    contributes to later iterations (its ledger, the server's metrics). Its folder of the job survives the crash
    (the ledger holds the iterations before and after it); where that folder is gone too (``folder_lost``: a
    replaced disk), the server deploys the job to the site again."""
    rounds, killed_at, site = 40, 3, SITES[-1]
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(result=run_poc(
        tmp_path, "modalitybank_multimodal", scale="tiny", rounds=rounds, progress=False, data_root=str(phantom_root),
        cache_dir=str(cache_dir), pretrained=str(pretrained), site_timeout=5.0)))
    runner.start()
    kits = tmp_path / "poc" / "modalitybank" / "prod_00"
    try:
        job_log = _wait_for(lambda: list((kits / SERVER).glob("*/log.txt")), rf"iteration {killed_at}/{rounds}", 600)
        assert crash(kits / site), f"no process of {site} found"
        crashed = time.time()
        if folder_lost:
            shutil.rmtree(kits / site / job_log.parent.name)
        _wait_for(lambda: [job_log], rf"site {site} at iteration \d+: no answer in time", 120)
        subprocess.run(["bash", str(kits / site / "startup" / "start.sh")], env=cli_env(
            tmp_path, NVFLARE_POC_WORKSPACE=str(tmp_path / "poc")), cwd=kits / site, check=True, timeout=60)
        server_log = _wait_for(lambda: [kits / SERVER / "log.txt"], rf"site {site} rejoined job", 300)
        back = _wait_for(lambda: [job_log], rf"site {site} is back at iteration (\d+)", 300)
        back_at = int(re.search(rf"site {site} is back at iteration (\d+)", back.read_text()).group(1))
    finally:
        runner.join(timeout=1800)
    result = out["result"]
    assert result["rounds"] == rounds and result["sites"] == list(SITES)
    assert killed_at < back_at < rounds, f"rejoined at iteration {back_at} ({time.time() - crashed:.0f} s after the crash)"
    assert (f"site {site} has no folder of job" in server_log.read_text()) == folder_lost  # deployed again only then
    # the site's ledger of the job: gradients sent after the restart by the new job process, and before the crash
    ledger = [json.loads(line) for line in (kits / site / result["job_id"] / wire.LEDGER_FILE).read_text().splitlines()]
    sent = sorted({e["iteration"] for e in ledger if e["direction"] == "sent" and (e["key"] or "").startswith("grad/")})
    after = [i for i in sent if i >= back_at - 1]
    assert after and after[0] == back_at - 1 and sent[-1] == rounds - 1
    before = [i for i in sent if i < killed_at + 1]
    if folder_lost:
        assert before == []  # the old ledger went with the folder
    else:
        assert before and before == list(range(len(before)))  # iterations 0.. up to the crash, kept
    metrics = [json.loads(line) for line in (Path(result["checkpoint"]) / "metrics.jsonl").read_text().splitlines()]
    assert f"{site}/t1" in metrics[-1]["losses"]  # it contributes to the last iteration


def test_provisioned_federation(phantom_root, pretrained, tmp_path) -> None:
    result = run_provisioned(tmp_path, "modalitybank_multimodal", scale="tiny", rounds=3, progress=False,
                             data_root=str(phantom_root), pretrained=str(pretrained))
    _check(result, tmp_path, 3)
    fed = json.loads(next((tmp_path / "kits").rglob("localhost/startup/fed_server.json")).read_text())
    assert fed["servers"][0]["connection_security"] == "mtls"


def test_client_of_another_ca_is_refused(tmp_path) -> None:
    result = foreign_ca_check(tmp_path, progress=False)
    assert result["client_error"] and "CERTIFICATE_VERIFY_FAILED" in result["client_error"]
    assert "hospital-a" not in result["clients_with_foreign"] and not result["server_saw_client"]
    assert result["probes"]["own_certificate"] == "answered"  # the probe reaches the server
    assert result["probes"]["foreign_certificate"] != "answered"  # B's certificate, even trusting A's CA
    assert result["probes"]["no_certificate"] != "answered"
    assert result["clients_with_own"] == ["hospital-a"]  # control: the same site with its own kit joins
    assert result["refused"]


def test_job_copy_leaves_out_what_job_submit_cannot_index(tmp_path) -> None:
    custom = tmp_path / "app" / "custom" / "bundle" / "configs"
    custom.mkdir(parents=True)
    (custom / "logging.conf").write_text("[loggers]\nkeys=root\n")  # a MONAI bundle's Python logging file
    (custom / "settings.conf").write_text("a { b = 1 }\n")  # HOCON: stays
    assert drop_unsubmittable(tmp_path) == ["app/custom/bundle/configs/logging.conf"]
    assert (custom / "settings.conf").is_file()
