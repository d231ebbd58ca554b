"""`modalitybank privacy-audit` at tiny scale, shortened (the embedded phantom and its pre-trained generator)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_privacy_audit_tiny_json(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "modalitybank.cli", "privacy-audit", "--scale", "tiny",
                           "--iterations", "30", "--epsilons", "1", "--out", str(tmp_path), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("| standard |") for line in lines)  # the table
    modes = result["modes"]
    assert set(modes) == {"standard", "adversarial", "dp-eps1"}
    for row in modes.values():
        assert {"psnr", "ssim", "mia_auc", "epsilon"} <= set(row)
        assert 0 <= row["mia_auc"] <= 1 and row["psnr"] > 0
    assert modes["standard"]["epsilon"] is None and 0 < modes["dp-eps1"]["epsilon"] <= 1.0
    # the L1 term hands the server its sign map: reconstruction beats the server's own fake by a margin
    assert modes["standard"]["psnr"] > modes["standard"]["psnr_fake"] + 1.0
    assert modes["dp-eps1"]["psnr"] < modes["standard"]["psnr"]
    assert (tmp_path / "reconstructions.png").is_file() and (tmp_path / "audit.json").is_file()
