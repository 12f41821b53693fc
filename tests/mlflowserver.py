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
from typing import IO

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


def start_server(
    folder: Path, port: int, host: str = "127.0.0.1", output: IO[bytes] | int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``server_command`` with ``SERVER_ENV``, its output to ``output``, in a session of its own: ``os.killpg(proc.pid,
    ...)`` stops the server and its uvicorn workers, nothing else."""
    return subprocess.Popen(
        server_command(folder, port, host),
        stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **SERVER_ENV},
    )  # fmt: skip


def wait_healthy(uri: str, proc: subprocess.Popen[bytes], timeout: float = 180.0, log: Path | None = None) -> None:
    """Returns once ``uri``'s ``/health`` answers 200. Raises if the server exits first or ``timeout`` s pass (a
    loaded machine starts one in 5-30 s), with the end of its ``log`` when it writes one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {code}"
                if code is not None
                else f"did not answer {uri}/health within {timeout:.0f} s"
            )
            tail = f":\n{log.read_text(errors='replace')[-2000:]}" if log is not None and log.exists() else ""
            raise RuntimeError(f"mlflow server {why}{tail}")
        time.sleep(0.2)


@contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serves a SQLite store in ``folder`` on ``host:port`` (``server_command``); yields its URI."""
    port = port or free_port()
    log_path = folder / "server.log"
    log = log_path.open("wb")
    proc = start_server(folder, port, host, output=log)
    uri = f"http://{host}:{port}"
    try:
        wait_healthy(uri, proc, log=log_path)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: its uvicorn workers, nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
