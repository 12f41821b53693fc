"""A driver killed with SIGKILL mid-run, then ``distmaml train --resume``: the same parameters as a run never stopped.

The interrupted run is a real ``python -m distmaml train`` process, killed with
SIGKILL (no handler, no cleanup) as soon as a checkpoint past the first shows
up; the resume and the uninterrupted run go through the same CLI in this
process. Once on a local folder, once entirely on an S3-compatible server on
loopback (moto): the task store prepared there, the run written there, resumed
from there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from s3server import s3_server

import distmaml
from distmaml import storage
from distmaml.cli import main

ROOT = Path(__file__).resolve().parent.parent


def kill_mid_run(out: str, args: list[str], cwd: Path, after_step: int, timeout: float = 300.0) -> int:
    """Starts ``distmaml train --out out ARGS``, SIGKILLs it once ``after_step`` is checkpointed; the last step saved."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distmaml", "train", "--quiet", "--out", out, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"step_{after_step:09d}.pt"
    deadline = time.monotonic() + timeout
    try:
        while target not in storage.listdir(storage.join(out, "checkpoints")):
            assert proc.poll() is None, f"the run ended before step {after_step}: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"no checkpoint of step {after_step} after {timeout} s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    steps = [int(n[5:14]) for n in storage.listdir(storage.join(out, "checkpoints")) if n.endswith(".pt")]
    return max(steps)


def check_same_run(resumed: str, whole: str, steps: int) -> None:
    a, b = distmaml.load_checkpoint(resumed), distmaml.load_checkpoint(whole)
    assert a.step == b.step == steps and a.config == b.config
    assert sorted(a.params) == sorted(b.params)
    for k, v in b.params.items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(a.params[k], v, rtol=0, atol=1e-12)
    ra = json.loads(storage.read_bytes(storage.join(resumed, "result.json")))
    rb = json.loads(storage.read_bytes(storage.join(whole, "result.json")))
    assert ra["steps"] == steps and ra["meta_test"]["mean"] == pytest.approx(rb["meta_test"]["mean"], rel=1e-9)


SINUSOID = [
    "meta.steps=40", "meta.batch_size=4", "meta.checkpoint_every=5", "meta.keep_checkpoints=2", "meta.val_every=0",
    "meta.test_tasks=8", "meta.val_tasks=8", "precision=float64", "tracking.enabled=false",
]  # fmt: skip


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = ["--workers", "0", *(x for o in SINUSOID for x in ("--set", o))]
    saved = kill_mid_run(str(tmp_path / "run"), sets, tmp_path, after_step=10)
    assert 10 <= saved < 40 and not (tmp_path / "run" / "result.json").exists()
    assert main(["train", "--quiet", "--resume", str(tmp_path / "run")]) == 0
    assert main(["train", "--quiet", "--out", str(tmp_path / "whole"), *sets]) == 0
    check_same_run(str(tmp_path / "run"), str(tmp_path / "whole"), 40)


GLYPHS = [
    "data.family=store", "data.path=s3://stores/glyphs", "model.filters=4", "data.queries=1", "meta.steps=16",
    "meta.batch_size=2", "meta.checkpoint_every=2", "meta.keep_checkpoints=2", "meta.val_every=0",
    "meta.test_tasks=4", "meta.val_tasks=4", "precision=float64", "tracking.enabled=false",
    "batching=loop",  # auto times per process: the resumed and the whole run could compute differently (a conv net)
]  # fmt: skip


@pytest.mark.slow
def test_s3_prepare_train_sigkill_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTMAML_CACHE", str(tmp_path / "cache"))  # where nodes copy the store from S3
    with s3_server(buckets=("stores", "runs")):
        prepare = ["prepare", "glyphs", "--out", "s3://stores/glyphs", "--classes", "30", "--drawings", "4"]
        assert main([*prepare, "--size", "16", "--val-classes", "5", "--test-classes", "5"]) == 0
        assert storage.listdir("s3://stores/glyphs") == [
            "metadata.json", "test.parquet", "train.parquet", "val.parquet"
        ]  # fmt: skip
        sets = ["--config", "glyphs_5w1s", "--workers", "0", *(x for o in GLYPHS for x in ("--set", o))]
        saved = kill_mid_run("s3://runs/a", sets, tmp_path, after_step=4)
        assert 4 <= saved < 16 and not storage.exists("s3://runs/a/result.json")
        assert main(["train", "--quiet", "--resume", "s3://runs/a"]) == 0
        assert main(["train", "--quiet", "--out", "s3://runs/whole", *sets]) == 0
        check_same_run("s3://runs/a", "s3://runs/whole", 16)
        assert storage.listdir("s3://runs/a") == ["checkpoints", "config.yaml", "result.json"]
        assert storage.listdir("s3://runs/a/checkpoints") == ["step_000000014.pt", "step_000000016.pt"]
        # evaluate reads the run and the store from S3 and writes eval.json there
        assert main(["evaluate", "--checkpoint", "s3://runs/a", "--tasks", "4"]) == 0
        assert json.loads(storage.read_bytes("s3://runs/a/eval.json"))["meta_test"]["tasks"] == 4
        assert list(tmp_path.iterdir()) == [tmp_path / "cache"]  # nothing written locally but the store's copy
