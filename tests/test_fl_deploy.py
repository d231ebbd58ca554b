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
from pathlib import Path

import pytest

from modalitybank import config
from modalitybank.data.sites import split_sites
from modalitybank.fl.deploy import SITES, drop_unsubmittable, run_poc, run_provisioned
from modalitybank.fl.jobs import simulate
from modalitybank.fl.policy import PACKAGE_PREFIX
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
