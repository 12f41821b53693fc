"""A tracking server that does not answer: one line naming tracking.uri within seconds, not MLflow's minutes of retries.

Against a real ``mlflow server`` on loopback: the probe lets it through, and
once it is gone, an MLflow call of the run fails within seconds under the
retry bounds the probe sets (MLflow's own defaults retry for about 4 minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflowserver import start_server, wait_healthy
from rayhead import free_port

from distmaml.cli import main
from distmaml.tracking.probe import HTTP_LIMITS, TrackingError, check_server


def test_train_fails_in_seconds_naming_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    port = free_port()  # nobody listens there
    began = time.monotonic()
    code = main(["train", "--workers", "2", "--out", "run", "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert time.monotonic() - began < 10
    assert code == 3
    err = capsys.readouterr().err
    assert err.strip() == (
        f"distmaml: error: tracking.uri = 'http://127.0.0.1:{port}': no MLflow server answers (Connection refused "
        f"after 0.0 s); start one with 'mlflow server --port {port}' or --set tracking.enabled=false"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything started
    for name, value in HTTP_LIMITS.items():
        assert os.environ[name] == value  # MLflow's retries bounded for the run, and its Ray processes


def test_a_listener_that_is_not_mlflow_is_refused(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/", server)
        with pytest.raises(TrackingError, match=r"does not answer as MLflow does \(HTTP 404 from .*/health"):
            check_server(f"http://127.0.0.1:{port}")
    finally:
        server.kill()
        server.wait()


def _wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout} s"
            time.sleep(0.5)


@pytest.mark.slow
def test_a_real_server_passes_and_its_loss_stops_the_run_in_seconds(tmp_path, monkeypatch):
    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    server = start_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server)
        check_server(uri)  # answers: no error, and the retry bounds are set
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment("probe"))
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    began = time.monotonic()
    with pytest.raises(Exception, match="Max retries exceeded|Connection refused"):
        client.log_metric(run.info.run_id, "loss", 1.0)
    assert time.monotonic() - began < 20  # MLflow's defaults: about 4 minutes
