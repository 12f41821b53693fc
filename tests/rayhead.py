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
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0, Ray takes 127.0.0.1 as this node's address wherever it would pick one itself
(``ray._private.services.get_node_ip_address``): ``ray start --node-ip-address 127.0.0.1`` alone is
turned into the address of the default route (``resolve_ip_for_localhost``), and so is every node the fake
multi-node provider starts. Its only other effect: ``ray start --address`` (a second node by the CLI) is
refused."""


STOP_GRACE = 1.0
"""Seconds between SIGTERM and SIGKILL when a head is stopped. Its Python processes (dashboard, log monitor,
agents, workers) exit within 0.1 s of SIGTERM; its raylet takes 10 s, and its gcs_server and the autoscaler's
monitor did not exit within 12 s (measured here), so a longer grace only waited for the SIGKILL. A test's head
holds nothing to save when it ends: its temporary folder is removed with it."""

START_ATTEMPTS = 3
"""Tries of ``ray start --head`` when it fails only because its raylet registered too slowly."""


PORTS_BELOW_EPHEMERAL = 12000
"""How many ports below the kernel's ephemeral range ``free_port`` picks from."""

RAY_WORKER_PORTS_END = 19999
"""The last of the ports Ray's workers take by default (``--min-worker-port 10002``, ``--max-worker-port``):
``free_port`` picks above them."""

_GIVEN: set[int] = set()
"""Ports ``free_port`` returned in this process: never returned twice (Ray refuses a head given one port for
two of its parts)."""


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server started next (a head's ports, MLflow, S3).

    Picked at random below the kernel's ephemeral range (``ip_local_port_range``), not where ``bind(0)``
    picks: the kernel gives ports of that range to every outgoing connection, so on a machine busy with tests
    one could take the port between its choice here and its server's bind (a Ray agent that cannot bind its
    port fails, and its raylet ends with it). Ports below the range go only to servers that name them.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    first = max(RAY_WORKER_PORTS_END + 1, low - PORTS_BELOW_EPHEMERAL)
    for _ in range(200 if first < low else 0):
        port = random.randrange(first, low)
        if port in _GIVEN:  # not bound yet, perhaps: a head's ports are chosen before it starts
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # none free there: what the kernel gives
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _GIVEN.add(port)
    return port


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

    def stop(self, grace: float = STOP_GRACE, keep_temp_dir: bool = False) -> None:
        """SIGTERM to each process of this head, SIGKILL to what is left after ``grace`` seconds."""
        stop_pids(self.pids, grace)
        if not keep_temp_dir:
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
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        LOOPBACK_ONLY: "0",
        # Ray's memory monitor counts the whole machine's memory, which other work on a shared machine fills:
        # it would kill this head's workers for it. The kernel's OOM killer still guards the machine.
        "RAY_memory_monitor_refresh_ms": os.environ.get("RAY_memory_monitor_refresh_ms", "0"),
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # distmaml, as on a real head
    env.update(extra_env or {})
    if not token_auth:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN")
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
        "--dashboard-port", str(free_port()),
        "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),  # not 10001: heads of tests running side by side
    ]  # fmt: skip
    if resources:
        cmd += ["--resources", resources]
    cmd += list(extra_args)
    for attempt in range(START_ATTEMPTS):
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        head = RayHead(f"127.0.0.1:{port}", temp_dir, proc.pid, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            head.stop()
            raise
        if proc.returncode == 0:
            return head
        # Ray gives its own raylet 30 s to register (node.py, not configurable): a machine busy with other
        # work misses that now and then. The same ports and folder again (a config there may name them).
        retry = b"timed out during startup" in out and attempt + 1 < START_ATTEMPTS
        head.stop(keep_temp_dir=retry)
        if not retry:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out.decode(errors='replace')}")
    raise AssertionError("unreachable")


def listening_addresses(pids: list[int]) -> dict[str, str]:
    """``{"host:port": command}`` of every TCP socket the processes ``pids`` listen on (from /proc)."""
    owners: dict[str, str] = {}
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[8:-1]] = command
        except OSError:
            continue
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owners:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            import ipaddress

            ip = ipaddress.ip_address(words)
            mapped = getattr(ip, "ipv4_mapped", None)
            found[f"{mapped or ip}:{int(hex_port, 16)}"] = owners[fields[9]]
    return found


def stop_pids(pids: Callable[[], list[int]], grace: float) -> None:
    """SIGTERM to every process ``pids()`` names, SIGKILL to what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids():
            break
