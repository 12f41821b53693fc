"""A real Ray head started with ``ray start --head`` on loopback, stopped by the ids of its own processes.

``ray stop`` would end every Ray process on the machine, other users' too; this
helper starts the head in a new session (``setsid``) with its own temporary
folder and free ports, and at the end signals only the processes of that
session or whose command line names that folder.

Token authentication: Ray 2.60 turns it on for a head when ``RAY_AUTH_MODE=token``
is set or a token file (``~/.ray/auth_token``) exists, and a client that
names an explicit address only sends a token when ``RAY_AUTH_MODE=token`` is
set and a token is found in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``. The head here gets a fresh token through the
environment, which ``env`` returns for the clients, so neither side depends on
(or writes) the home folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayHead:
    address: str
    temp_dir: Path
    sid: int
    env: dict[str, str]
    """Environment for clients of this head: RAY_ADDRESS and the auth token."""

    def pids(self) -> list[int]:
        """Live processes of this head: its session, or naming its temporary folder."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    continue
                if os.getsid(pid) == self.sid or str(self.temp_dir) in cmdline:
                    found.append(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        return found

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to each process of this head, SIGKILL to what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def new_temp_dir() -> Path:
    """A private folder for one head; short, because Ray's socket paths under it must fit 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))


def start_head(
    num_cpus: int = 2,
    resources: str | None = None,
    token_auth: bool = True,
    timeout: float = 120.0,
    *,
    port: int | None = None,
    temp_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> RayHead:
    """``ray start --head`` on 127.0.0.1 with free ports, a private temp dir and (by default) token auth.

    ``port`` and ``temp_dir`` (from ``free_port`` and ``new_temp_dir``) may be
    chosen beforehand, when a file passed in ``extra_args`` must name them;
    ``extra_env`` is added to the head's environment (and the clients').
    """
    temp_dir = temp_dir or new_temp_dir()
    port = port or free_port()
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(extra_env or {})
    if not token_auth:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN")
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
        "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
    ]  # fmt: skip
    if resources:
        cmd += ["--resources", resources]
    cmd += list(extra_args)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    head = RayHead(f"127.0.0.1:{port}", temp_dir, proc.pid, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        head.stop()
        raise
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out.decode(errors='replace')}")
    return head
