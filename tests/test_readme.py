"""The README's promises: its two commands, and what the main job reaches."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_fresh_machine_commands():
    first, second = _bash_blocks()[:2]
    assert "pip install torch==2.14.1 torchvision==0.29.1 -e . " in first
    assert first.strip().endswith("distmaml train --out runs/sinusoid")
    assert "-e '.[test]'" in second and second.strip().endswith("ci/test.sh")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci/test.sh" in ci and "-e '.[test]'" in ci  # CI runs the README's test command


@pytest.mark.slow
def test_the_main_job_reaches_the_promised_mse(tmp_path):
    """`distmaml train --out DIR` as the README runs it: the sinusoid recipe on 2 Ray workers."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "distmaml", "train", "--out", str(tmp_path / "run"), "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["workers"] == 2
    assert result["meta_test"]["tasks"] == 600
    assert result["meta_test"]["mean"] < 1.0, result["meta_test"]
    assert result["meta_test_unadapted"]["mean"] > 2.5, result["meta_test_unadapted"]
    assert "meta-test, 600 held-out tasks, 10 inner steps" in proc.stdout
