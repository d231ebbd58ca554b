"""A site's own settings file (local/modalitybank_site.json)."""

from __future__ import annotations

import json

import pytest

from modalitybank.fl.site_config import (
    ENV_VAR,
    SITE_CONFIG_FILE,
    read_site_config,
    site_state_dir,
    with_state_dir,
)


def test_flat_settings_are_the_sites_own(tmp_path) -> None:
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_root": "/data/brats"}))
    assert read_site_config("hospital-a", tmp_path) == {"data_root": "/data/brats"}


def test_shared_workspace_settings_per_site_over_defaults(tmp_path) -> None:
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps(
        {"default": {"data_root": "/d", "cache_dir": "/c"}, "sites": {"site-2": {"data_root": "/e"}}}))
    assert read_site_config("site-1", tmp_path) == {"data_root": "/d", "cache_dir": "/c"}
    assert read_site_config("site-2", tmp_path) == {"data_root": "/e", "cache_dir": "/c"}


def test_no_file_no_settings_and_a_bad_file_is_named(tmp_path, monkeypatch) -> None:
    assert read_site_config("site-1", tmp_path) == {}
    (tmp_path / SITE_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{SITE_CONFIG_FILE}: not valid JSON"):
        read_site_config("site-1", tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json: no such file"):
        read_site_config("site-1", tmp_path)


def test_state_dir_is_per_site_and_a_sites_own_choice_wins(tmp_path) -> None:
    """The simulator's sites keep their state outside its (wiped) workspace, unless they chose a folder."""
    flat = with_state_dir({"data_root": "/d"}, tmp_path / "sites")
    assert flat == {"default": {"data_root": "/d", "state_dir": str(tmp_path / "sites")}}
    per_site = with_state_dir({"default": {"state_dir": "/own"}, "sites": {"site-2": {"data_root": "/e"}}}, "/x")
    assert per_site["default"]["state_dir"] == "/own" and per_site["sites"] == {"site-2": {"data_root": "/e"}}
    assert with_state_dir(None, "/x") == {"default": {"state_dir": "/x"}}
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps(flat))
    own = read_site_config("site-3", tmp_path)
    assert site_state_dir("site-3", own, tmp_path / "ws") == tmp_path / "sites" / "site-3"
    assert site_state_dir("site-3", {}, tmp_path / "ws") == tmp_path / "ws"
