"""``mlflow server`` on loopback, as cluster/config.yaml's head starts it, stopped by its process group id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rayhead import free_port

SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""As cluster/config.yaml, local.yaml and kuberay/mlflow.yaml start the server: without MLflow 3's job runner,
8 processes distmaml does not use (1.8 GiB and about 14 CPU-s at start instead of 0.5 GiB and 5, measured)."""


def server_command(folder: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """``mlflow server`` over a SQLite store in ``folder`` on ``host:port``, as cluster/config.yaml's head starts
    it (one worker, artifacts served from ``folder/artifacts``, only its own address in the Host header); run it
    with ``SERVER_ENV`` in the environment."""
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return [
        mlflow, "server", "--host", host, "--port", str(port), "--workers", "1", "--serve-artifacts",
        "--allowed-hosts", f"{host}:{port},localhost:{port}",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip


@contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serves a SQLite store in ``folder`` on ``host:port`` (``server_command``); yields its URI."""
    port = port or free_port()
    cmd = server_command(folder, port, host)
    log = (folder / "server.log").open("wb")
    env = {**os.environ, **SERVER_ENV}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: its uvicorn workers, nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
