"""Machines for Ray's cluster launcher on this one machine: addresses on loopback reached over SSH.

Ray's ``local`` provider reaches every machine of ``cluster/local.yaml`` with
``ssh USER@IP`` (``ray/autoscaler/_private/command_runner.py``,
``SSHCommandRunner``), port 22, options from ``auth:`` only. Here each
"machine" is one address of 127.0.0.0/8 (all of it is loopback) served by one
``sshd`` that this module starts on a free port with its own configuration:

- a throwaway user with a throwaway key, made here and removed by ``stop``;
- one home folder per address: ``Match LocalAddress`` in the sshd
  configuration sets ``HOME`` (and ``TMPDIR``, where Ray keeps its sockets and
  logs) per address, so ``~/distmaml``, ``~/ray_bootstrap_config.yaml`` and
  ``pip install -e ~/distmaml`` on one "machine" do not touch another's, as on
  separate machines. The head's home is the user's own (``ray submit`` runs in
  it, as sshd starts every session there);
- in each home, the Python environment a lab machine would have: ``~/venv``
  (an empty venv whose ``.pth`` file puts this test's site-packages on its
  path, so nothing is downloaded) activated from ``~/.bashrc``, which Ray's
  SSH commands source;
- ``~/bin/stop-ray-node``, which stops the Ray processes of this "machine"
  only (this user's, with this address's ``TMPDIR``, by pid), and a ``ray``
  in ``~/bin`` that runs it for ``ray stop``: ``ray stop`` ends every Ray
  process its user may signal, which on one machine would be every
  "machine"'s, and ``ray down`` sends a ``ray stop`` of its own
  (``commands.py``, ``teardown_cluster``) that no YAML line can change.

The port is not 22 (a machine may run its own sshd there): the cluster file
reaches it with one added line, ``ssh_proxy_command: nc %h PORT`` (OpenBSD
netcat), which the autoscaler on the head uses too.

Needs root (``useradd``, ``sshd``) and Debian's ``openssh-server``,
``netcat-openbsd`` and ``rsync`` (the launcher's file mounts); ``.ci/run``
installs them. ``missing()`` says what is absent.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from rayhead import free_port, stop_pids

SSHD = "/usr/sbin/sshd"
NEEDED = {"sshd": ("openssh-server", SSHD), "nc": ("netcat-openbsd", "nc"), "rsync": ("rsync", "rsync")}

# Ray's processes of one "machine": this user's, with that address's TMPDIR (inherited from the SSH session
# that ran `ray start`), whose command line names Ray, outside the session running this script.
STOP_NODE = """\
#!{python}
import os, signal, sys, time

me, tmp, sid = os.getuid(), os.environ["TMPDIR"], os.getsid(0)


def pids():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{{pid}}").st_uid != me or os.getsid(pid) == sid:
                continue
            env = open(f"/proc/{{pid}}/environ", "rb").read().split(b"\\0")
            cmd = open(f"/proc/{{pid}}/cmdline", "rb").read()
            state = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, ProcessLookupError):
            continue
        if state != "Z" and f"TMPDIR={{tmp}}".encode() in env and b"ray" in cmd:
            found.append(pid)
    return found


for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
    for pid in pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids() and time.monotonic() < deadline:
        time.sleep(0.2)
print(f"stop-ray-node: stopped the Ray processes of this node (TMPDIR={{tmp}})")
"""

CONSOLE_SCRIPTS = ("ray", "mlflow")  # what the cluster YAML's commands run
CONSOLE_SCRIPT = """\
#!{python}
import sys
from {module} import {attr}
sys.exit({attr}())
"""

RAY_WRAPPER = """\
#!/bin/sh
# `ray stop` ends every Ray process of this user on the machine, other "machines'" too: stop this one's only.
if [ "$1" = stop ]; then exec "$HOME/bin/stop-ray-node"; fi
exec "$HOME/venv/bin/ray" "$@"
"""


def missing() -> list[str]:
    """What this machine lacks to run the launcher test: root, or one of the Debian packages (by name)."""
    why = [] if os.geteuid() == 0 else ["root (useradd, sshd)"]
    for _, (package, tool) in NEEDED.items():
        if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool)):
            why.append(f"{tool} (apt-get install -y {package})")
    return why


@dataclass
class Machines:
    """The "machines" at ``addresses`` (the first is the head), their user, key, sshd and homes."""

    base: Path
    user: str
    key: Path
    port: int
    homes: dict[str, Path]
    sshd: subprocess.Popen[bytes]
    shared: Path
    """A folder every "machine" reads and writes, as a lab's NFS share."""
    mlflow_port: int
    uid: int
    tmp: dict[str, Path]
    """Each "machine"'s TMPDIR, under which its Ray keeps sockets and logs."""
    log: Path

    def pids(self) -> list[int]:
        """Live processes of the throwaway user: everything that ran on the "machines"."""
        uid, found = self.uid, []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if entry.stat().st_uid == uid and state != "Z":
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
        return found

    def run(self, address: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``command`` over SSH on the "machine" at ``address``, as the launcher runs it (a login shell)."""
        return subprocess.run(
            ["ssh", *self.ssh_options(), f"{self.user}@{address}", f"bash --login -c -i 'source ~/.bashrc; {command}'"],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={os.devnull}", "-o", f"ProxyCommand=nc %h {self.port}", "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def stop(self) -> None:
        """Every process of the user by pid (TERM, then KILL), then sshd, the user and the folders."""
        stop_pids(self.pids, 15.0)
        if self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        subprocess.run(["userdel", self.user], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _python_for(user: str) -> str:
    """An interpreter of this test's Python version that ``user`` may run (pyenv's may sit in /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.base_prefix) / "bin" / f"python{version}", Path(f"/usr/bin/python{version}")]
    candidates.append(Path(f"/usr/local/bin/python{version}"))
    for python in candidates:
        probe = subprocess.run(
            ["runuser", "-u", user, "--", str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True,
        )  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return str(python)
    raise RuntimeError(f"no Python {version} that user {user} may run among {', '.join(map(str, candidates))}")


def _site_dirs() -> list[str]:
    """This test's site-packages folders, in path order (a venv's own, then any its .pth files add)."""
    return [p for p in sys.path if p.rstrip("/").endswith("site-packages") and Path(p).is_dir()]


def _others_may_read(folder: Path) -> bool:
    """Whether another user may list ``folder`` and pass through every folder above it."""
    parents = folder.resolve().parents
    return folder.stat().st_mode & 0o005 == 0o005 and all(p.stat().st_mode & 0o001 for p in parents)


def start_machines(addresses: list[str], timeout: float = 60.0) -> Machines:
    """A user, key and sshd for ``addresses`` (the head first), with a home and Python environment for each."""
    if why := missing():
        raise RuntimeError("the launcher test needs " + ", ".join(why))
    if closed := [s for s in _site_dirs() if not _others_may_read(Path(s))]:
        raise RuntimeError(
            f"the launcher test's user could not import this Python environment's packages: {', '.join(closed)} "
            "(or a folder above) is closed to other users; a virtual environment under `mktemp -d` needs "
            "`chmod 755` on that folder (.ci/run does it)"
        )
    base = Path(tempfile.mkdtemp(prefix="lt", dir="/tmp"))  # short: Ray's socket paths under TMPDIR must fit 107 bytes
    base.chmod(0o755)
    user = "dmlt" + secrets.token_hex(4)
    homes = {a: base / f"h{a.rsplit('.', 1)[1]}" for a in addresses}
    tmps = {a: base / f"t{a.rsplit('.', 1)[1]}" for a in addresses}
    head_home = homes[addresses[0]]
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", str(head_home), "--shell", "/bin/bash", user], check=True
    )
    # "*": no password can log in, but the account is not locked (sshd without PAM refuses locked ones)
    subprocess.run(["usermod", "-p", "*", user], check=True)
    mlflow_port = free_port()
    port = free_port()
    shared = base / "shared"
    sshd = subprocess.Popen(["true"])  # replaced below; stop() needs a process either way
    uid = pwd.getpwnam(user).pw_uid
    machines = Machines(base, user, base / "key", port, homes, sshd, shared, mlflow_port, uid, tmps, base / "sshd.log")
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "hostkey")], check=True)
        shared.mkdir()
        shutil.chown(shared, user)
        python, sites = _python_for(user), _site_dirs()
        for address, home in homes.items():
            tmp = tmps[address]
            for folder in (home, tmp, home / ".ssh", home / "bin"):
                folder.mkdir(mode=0o700 if folder.name == ".ssh" else 0o755)
                shutil.chown(folder, user)
            _as(user, [python, "-m", "venv", "--without-pip", str(home / "venv")])
            site = next((home / "venv" / "lib").glob("python*/site-packages"))
            _write(user, site / "zz_test_env.pth", "".join(f"import site; site.addsitedir({s!r})\n" for s in sites))
            for name in CONSOLE_SCRIPTS:  # the packages came through the .pth file, their commands did not
                entry = next(iter(importlib.metadata.entry_points(group="console_scripts", name=name)))
                script = CONSOLE_SCRIPT.format(python=home / "venv" / "bin" / "python", module=entry.module,
                                               attr=entry.attr)  # fmt: skip
                _write(user, home / "venv" / "bin" / name, script, 0o755)
            _write(user, home / ".ssh" / "authorized_keys", (base / "key.pub").read_text(), 0o600)
            # The head's autoscaler reaches the workers with ssh on port 22: Ray drops ssh_proxy_command from
            # the config it copies to the head (commands.py, _set_up_config_for_head_node). Its ssh reads
            # this (the passwd home's, whatever HOME says), as a lab user's ~/.ssh/config would name a port.
            _write(user, home / ".ssh" / "config", "".join(f"Host {a}\n  Port {port}\n" for a in addresses), 0o600)
            _write(user, home / "bin" / "stop-ray-node", STOP_NODE.format(python=home / "venv" / "bin" / "python"))
            _write(user, home / "bin" / "ray", RAY_WRAPPER, 0o755)
            (home / "bin" / "stop-ray-node").chmod(0o755)
            _write(
                user,
                home / ".bashrc",
                textwrap.dedent(
                    f"""\
                    # This "machine"'s environment (tests/sshnodes.py): the Python environment, then its own tools.
                    . ~/venv/bin/activate
                    export PATH="$HOME/bin:$PATH"
                    export DISTMAML_MLFLOW_PORT={mlflow_port}  # where cluster/submit.py looks for the head's MLflow
                    """
                ),
            )
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder (Debian)
        config = base / "sshd_config"
        lines = [
            f"Port {port}",
            *(f"ListenAddress {a}" for a in addresses),
            f"HostKey {base / 'hostkey'}",
            f"PidFile {base / 'sshd.pid'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            f"AllowUsers {user}",
            "MaxStartups 100",
            "MaxSessions 100",
            "X11Forwarding no",
        ]
        for address, home in homes.items():
            tmp = tmps[address]
            lines += [f"Match LocalAddress {address}", f"  SetEnv HOME={home} TMPDIR={tmp}"]
        config.write_text("\n".join(lines) + "\n")
        machines.sshd = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(machines.log, "wb")
        )
        deadline = time.monotonic() + timeout
        while machines.log.read_text().count("Server listening on") < len(addresses):
            if machines.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start:\n{machines.log.read_text()}")
            time.sleep(0.1)
        for address in addresses:
            probe = machines.run(address, 'python -c "import ray, torch, distmaml" && echo "$HOME $TMPDIR"')
            if probe.returncode != 0:
                raise RuntimeError(f"the machine at {address} cannot run this test's Python:\n{probe.stderr}")
    except BaseException:
        machines.stop()
        raise
    return machines


def _as(user: str, cmd: list[str]) -> None:
    subprocess.run(["runuser", "-u", user, "--", *cmd], check=True, capture_output=True, cwd="/")


def _write(user: str, path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
    shutil.chown(path, user)
