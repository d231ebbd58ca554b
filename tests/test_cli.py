"""The `modalitybank` command as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["modalitybank", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"modalitybank {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_explains_each_command() -> None:
    out = run("--help").stdout
    for cmd in ("data", "pretrain", "train-local", "synthesize", "params", "bench", "demo"):
        assert cmd in out
    assert "--keep-real" in run("synthesize", "--help").stdout


def test_params_json() -> None:
    from modalitybank import config
    from modalitybank.networks import build_generator

    result = last_json(run("params", "--json"))
    gen = build_generator(config.preset("small")["model"])
    gen.bank.add("x")
    assert result["base_params"] == sum(p.numel() for n, p in gen.named_parameters() if ".entries." not in n)
    assert result["entry_params"] == sum(p.numel() for p in gen.bank.entry_parameters("x"))
    paper = last_json(run("params", "--scale", "paper", "--json"))
    assert paper["base_params"] > 5 * result["base_params"] and paper["entry_params"] < paper["base_params"] / 4


@pytest.mark.slow
def test_bench_layers_json() -> None:
    result = last_json(run("bench", "layers", "--scale", "tiny", "--steps", "1", "--rounds", "2", "--json"))
    assert result["train_ratio"] > 0 and result["infer_ratio"] > 0
    assert result["train_seconds_plain"] > 0 and result["infer_seconds_plain"] > 0
    assert result["norm"] == "brain" and result["norm_train_ratio"] > 0
    assert result["precision"] == "float32" and result["precision_train_ratio"] == 1.0  # tiny's: no second step
    assert result["compile"] == "never" and not result["compile_effective"] and result["compile_train_ratio"] == 1.0


def test_bad_data_folder_is_a_clear_error(tmp_path) -> None:
    proc = run("pretrain", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_pretrain_then_synthesize_via_cli(phantom_root, cache_dir, tmp_path) -> None:
    pre = last_json(run("pretrain", "--data", str(phantom_root), "--run-dir", str(tmp_path / "pre"),
                        "--iterations", "3", "--cache-dir", str(cache_dir), "--quiet", "--json"))
    assert pre["iterations"] == 3
    base = last_json(run("synthesize", "--generator", str(tmp_path / "pre"), "--data", str(phantom_root),
                         "--out", str(tmp_path / "syn_base"), "--modalities", "t1c", "--quiet", "--json"))
    assert base["synthetic"] == base["cases"] > 0  # the base makes its own modality (T1c) without a bank entry
    bank = last_json(run("train-local", "--data", str(phantom_root), "--pretrained", str(tmp_path / "pre"),
                         "--run-dir", str(tmp_path / "bank"), "--iterations", "2", "--cache-dir", str(cache_dir),
                         "--quiet", "--json"))
    assert set(bank["quality"]) == {"t1", "t2", "flair"}
    assert (tmp_path / "bank" / "fig_modalities.png").stat().st_size > 10_000
    assert (tmp_path / "bank" / "loss_curves.png").is_file()
    syn = last_json(run("synthesize", "--generator", str(tmp_path / "bank"), "--data", str(phantom_root),
                        "--out", str(tmp_path / "syn"), "--modalities", "flair", "t2", "--quiet", "--json"))
    datalist = json.loads((tmp_path / "syn" / "datalist.json").read_text())
    assert syn["cases"] == 2 and datalist["modalities"] == ["flair", "t2"]
    assert all(len(e["image"]) == 2 for e in datalist["training"])


def test_module_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "modalitybank.cli", "params", "--scale", "tiny", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "base_params" in proc.stdout
