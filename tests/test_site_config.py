"""A site's own settings file (local/modalitybank_site.json)."""

from __future__ import annotations

import json

import pytest

from modalitybank.fl.site_config import ENV_VAR, SITE_CONFIG_FILE, read_site_config


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
