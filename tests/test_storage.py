"""Storage on local folders and on a real S3-compatible server (moto, loopback): files, stores, runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from s3server import s3_server

import distmaml
from distmaml import storage
from distmaml.cli import main
from distmaml.config import load_config
from distmaml.run.assembly import build_network, init_meta_params


@pytest.fixture(scope="module")
def s3():
    with s3_server(buckets=("bucket", "stores")) as endpoint:
        yield endpoint


def test_paths_and_uris():
    assert storage.location("file:///tmp/runs/a") == Path("/tmp/runs/a") == storage.location("/tmp/runs/a")
    assert storage.join("s3://b/runs/", "checkpoints", "x.pt") == "s3://b/runs/checkpoints/x.pt"
    assert storage.parent("s3://b/runs/a/checkpoints") == "s3://b/runs/a"
    assert storage.name("gs://b/stores/omniglot") == "omniglot"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("/tmp/x") and not storage.is_uri("file:///tmp/x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_operations(where, s3, tmp_path):
    base = str(tmp_path / "d") if where == "local" else "s3://bucket/ops"
    f = storage.join(base, "sub", "a.bin")
    assert not storage.exists(f) and storage.listdir(base) == []
    storage.makedirs(storage.join(base, "sub"))
    storage.write_bytes_atomic(f, b"one")
    storage.write_bytes_atomic(storage.join(base, "sub", "b.bin"), b"two")
    assert storage.read_bytes(f) == b"one" and storage.is_file(f) and storage.is_dir(storage.join(base, "sub"))
    storage.write_bytes_atomic(f, b"replaced")
    assert storage.read_bytes(f) == b"replaced"
    assert storage.listdir(storage.join(base, "sub")) == ["a.bin", "b.bin"]
    storage.delete(f)
    storage.delete(f)  # a missing file is not an error
    assert not storage.exists(f) and storage.listdir(storage.join(base, "sub")) == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f)


def test_failed_local_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    storage.write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


def test_endpoint_from_distmaml_variable(s3, monkeypatch):
    storage.write_bytes_atomic("s3://bucket/env/x", b"via AWS_ENDPOINT_URL")
    # the same server named only through DISTMAML_S3_ENDPOINT
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(storage.ENDPOINT_ENV, s3)
    assert storage.read_bytes("s3://bucket/env/x") == b"via AWS_ENDPOINT_URL"


def test_cached_dir_downloads_a_store_once(s3, tmp_path):
    files = {"meta.json": b'{"classes": 3}', "train/part-0.parquet": os.urandom(3000), "val/part-0.parquet": b"v"}
    for rel, data in files.items():
        storage.write_bytes_atomic(f"s3://stores/omni/{rel}", data)
    local = storage.cached_dir("s3://stores/omni", tmp_path / "cache")
    assert {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    assert storage.cached_dir("s3://stores/omni", tmp_path / "cache") == local  # second call: no copy
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [local.name]  # nothing half-copied left
    storage.write_bytes_atomic("s3://stores/omni/val/part-0.parquet", b"rewritten")
    again = storage.cached_dir("s3://stores/omni", tmp_path / "cache")
    assert again != local and (again / "val" / "part-0.parquet").read_bytes() == b"rewritten"
    assert storage.cached_dir(tmp_path, tmp_path / "cache") == tmp_path  # local folders are used in place
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.cached_dir("s3://stores/missing", tmp_path / "cache")


def test_unwritable_run_directories_are_refused(s3, tmp_path):
    storage.check_writable(tmp_path / "ok")
    storage.check_writable("s3://bucket/ok")
    assert storage.listdir(tmp_path / "ok") == [] and storage.listdir("s3://bucket/ok") == []  # probe removed
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # tests run as root, for whom chmod stops nothing: a folder under a regular file, /proc and a missing
    # bucket fail for every user
    for bad in (blocker / "run", "/proc/distmaml-run", "s3://no-such-bucket/run"):
        with pytest.raises(storage.StorageError, match="cannot write there"):
            storage.check_writable(bad)


def test_cli_refuses_unwritable_out_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert (
        main(["train", "--quiet", "--out", str(blocker / "run"), "--set", "meta.steps=100000", "--workers", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"distmaml: error: --out {blocker / 'run'}: cannot write there")
    assert len(err.strip().splitlines()) == 1


def test_train_out_on_s3_refuses_an_existing_run(s3, capsys):
    storage.write_bytes_atomic("s3://bucket/taken/checkpoints/step_000000004.pt", b"x")
    assert main(["train", "--quiet", "--out", "s3://bucket/taken", "--workers", "0"]) == 2
    assert "already holds a run; use --resume s3://bucket/taken" in capsys.readouterr().err


def test_non_finite_loss_checkpoints_the_last_good_state(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        ["train", "--quiet", "--out", str(run), "--workers", "0", "--set", "inner.lr=1.0e+30"]
        + ["--set", "meta.checkpoint_every=1000", "--set", "tracking.enabled=false"]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "meta-step 0: the meta-loss or meta-gradient is not finite" in err and "lower inner.lr (now 1e+30)" in err
    assert f"the last good state (step 0) is saved in {run / 'checkpoints' / 'step_000000000.pt'}" in err
    ckpt = distmaml.load_checkpoint(run)
    config = load_config("sinusoid", ["inner.lr=1.0e+30"])
    fresh = init_meta_params(config, build_network(config))
    assert ckpt.step == 0
    for k, v in fresh.items():  # the initial parameters, untouched by the non-finite step
        assert torch.isfinite(ckpt.params[k]).all()
        torch.testing.assert_close(ckpt.params[k], v, rtol=0, atol=0)
