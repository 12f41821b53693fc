"""Ray's cluster launcher for real, on this machine: ``ray up``, ``ray submit`` twice and ``ray down``.

The journey of the README's "Run on a cluster" section with ``cluster/local.yaml``
(Ray's ``local`` provider: machines a lab owns, reached over SSH): ``ray up``
from a fresh ``git clone`` of the repository, ``ray submit ... cluster/submit.py
-- train ...``, ``ray submit ... -- tune --space tune_spaces/sinusoid.yaml
--storage ...``, ``ray down``. The machines are addresses of this machine's
loopback (head 127.0.0.2, one worker 127.0.0.3; see ``HEAD``), each with its own
home folder, reached by the launcher over SSH as a throwaway user
(``tests/sshnodes.py`` makes the user, key, sshd and homes, and removes them).

The test's copy of ``cluster/local.yaml`` differs from the shipped file only
where ``DIFFERENCES`` says, each for the reason given there; every other line,
``file_mounts`` and ``setup_commands`` included, is the shipped one. Each
difference must apply exactly once (or as often as stated), so a change to the
shipped file that one of them no longer fits fails here rather than being
silently skipped. The Python environment that ``setup_commands`` install into
is prepared by the test (``~/venv`` on each "machine", the test's own packages),
so its ``pip install`` of torch and Ray finds them installed and installs the
cloned project alone.

Never ``ray stop`` here: it would end every Ray process on the machine. The
copy stops Ray with ``stop-ray-node`` (one "machine"'s processes, by pid),
and the "machines"' ``ray`` runs that for the ``ray stop`` that ``ray down``
sends on its own. Whatever is left, the test ends by the throwaway user's pids.

Needs root and Debian's openssh-server, netcat-openbsd and rsync, which
``.ci/run`` installs: in CI (``CI`` set) their absence fails the test, elsewhere
it skips with what to install. About 3 minutes (2026-12-03, 2 cores: ``ray up``
about 1, the worker joined within 1.5, both submits and ``ray down``).

What it found, each fixed where the user meets it: Ray 2.50 and later start the
head's autoscaler as its second version under ``ray up``, which never starts a
``local`` provider's workers (the head is not recorded as running on its own
machine; the autoscaler counts it as gone and logs "Adding 1 node(s)" every 5 s
without launching any), so ``cluster/local.yaml`` starts the head with
``RAY_enable_autoscaler_v2=0``; a head at 127.0.0.1 is advertised at the
machine's outward address (``HEAD`` below); a run submitted before the workers
join waits for them (``placement.node_types``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from projectcopy import fresh_clone
from rayhead import free_port
from sshnodes import Machines, missing, start_machines

# Not 127.0.0.1 for the head: `ray start --node-ip-address=127.0.0.1` advertises the machine's outward address
# instead (ray/scripts/scripts.py calls services.resolve_ip_for_localhost, which replaces 127.0.0.1, ::1 and
# localhost with the address Ray finds for the node); other loopback addresses are kept as given.
# One worker: the journey needs one, and each costs a setup over SSH.
HEAD, WORKERS = "127.0.0.2", ["127.0.0.3"]
# Where an SSH session on a "machine" learns which address it was reached at: the one the YAML names.
THIS_ADDRESS = "$(echo $SSH_CONNECTION | cut -d' ' -f3)"
STEPS = 4
TINY = [
    "--set", f"meta.steps={STEPS}", "--set", "meta.batch_size=4", "--set", "meta.val_every=2",
    "--set", "meta.val_tasks=8", "--set", "meta.test_tasks=8", "--quiet",
]  # fmt: skip

pytestmark = pytest.mark.slow


def differences(machines: Machines, gcs_port: int, dashboard_port: int) -> list[tuple[str, str, int, str]]:
    """(shipped text, the test's text, how many times, why): every way the test's copy differs."""
    loopback = "the machines are addresses of this machine's loopback"
    mlflow = machines.mlflow_port
    return [
        ("head_ip: 10.0.0.10", f"head_ip: {HEAD}", 1, loopback),
        ("    - 10.0.0.11\n    - 10.0.0.12\n", "".join(f"    - {w}\n" for w in WORKERS), 1, loopback),
        ("ssh_user: ubuntu", f"ssh_user: {machines.user}", 1, "a throwaway user the test makes"),
        (
            "ssh_private_key: ~/.ssh/id_ed25519",
            f"ssh_private_key: {machines.key}\n  ssh_proxy_command: nc %h {machines.port}",
            1,
            "the test's key; its sshd listens on a free port (Ray's SSH always dials port 22)",
        ),
        ("- ray stop", "- stop-ray-node", 2, "ray stop ends every Ray process on this shared machine"),
        ("--port=6379", f"--port={gcs_port}", 1, "6379 may be another Ray's on this machine"),
        ("$RAY_HEAD_IP:6379", f"$RAY_HEAD_IP:{gcs_port}", 1, "the same port"),
        (
            "ray start --head",
            f"ray start --head --node-ip-address={THIS_ADDRESS}",
            1,
            "unnamed, every node takes the address that routes off this machine, the same for all three",
        ),
        ("ray start --address=", f"ray start --node-ip-address={THIS_ADDRESS} --address=", 1, "the same"),
        (
            "--dashboard-host=127.0.0.1",
            f"--dashboard-host=127.0.0.1 --dashboard-port={dashboard_port}",
            1,
            "8265 may be another Ray's dashboard on this machine",
        ),
        (
            "IP=$(hostname -I | awk '{print $1}')",
            f"IP={THIS_ADDRESS}",
            1,
            "tests serve on loopback only, never on the address `hostname -I` prints",
        ),
        (
            '--port 5000 --allowed-hosts "$IP:5000,localhost:5000,127.0.0.1:5000"',
            f'--port {mlflow} --allowed-hosts "$IP:{mlflow},localhost:{mlflow},127.0.0.1:{mlflow}"',
            1,
            "5000 may be another MLflow's on this machine",
        ),
        ("/dev/tcp/$IP/5000", f"/dev/tcp/$IP/{mlflow}", 1, "the same port"),
    ]


def cluster_copy(shipped: str, diffs: list[tuple[str, str, int, str]]) -> str:
    """The shipped YAML with ``diffs`` applied, each exactly as often as it says."""
    text = shipped
    for old, new, count, why in diffs:
        found = text.count(old)
        assert found == count, (
            f"the shipped cluster/local.yaml has {old!r} {found} times, the test expects {count} ({why})"
        )
        text = text.replace(old, new)
    return text


def _require_machines() -> None:
    if why := missing():
        message = "the launcher test needs " + ", ".join(why) + " (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_ray_up_submit_train_and_tune_then_down(tmp_path):
    _require_machines()
    machines = start_machines([HEAD, *WORKERS])
    timings: dict[str, float] = {}
    try:
        clone = tmp_path / "clone"
        fresh_clone(clone)
        config = tmp_path / "local-test.yaml"
        config.write_text(
            cluster_copy(
                (clone / "cluster" / "local.yaml").read_text(), differences(machines, free_port(), free_port())
            )
        )
        ray = str(Path(sys.executable).with_name("ray"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # the launcher keeps its cluster state under TMPDIR/ray (local/config.py): this test's own
        env.update(TMPDIR=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")

        def launcher(step: str, *args: str, timeout: float = 1800) -> str:
            start = time.monotonic()
            proc = subprocess.run(
                [ray, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            timings[step] = time.monotonic() - start
            (tmp_path / f"{step}.log").write_text(proc.stdout + proc.stderr)
            assert proc.returncode == 0, f"ray {' '.join(args)}:\n{(proc.stdout + proc.stderr)[-6000:]}"
            return proc.stdout + proc.stderr

        journey = time.monotonic()
        launcher("up", "up", "-y", "--disable-usage-stats", "--no-config-cache", str(config))
        head_home = machines.homes[HEAD]
        # the head runs the cloned project, installed by the shipped setup_commands into the prepared environment
        where = launcher("exec", "exec", str(config), 'cd / && python -c "import distmaml; print(distmaml.__file__)"')
        assert str(head_home / "distmaml" / "distmaml" / "__init__.py") in where

        # `ray up` returns once the head is up; the head's autoscaler then sets up the workers (the same
        # setup_commands) and starts Ray there. A run submitted before they join waits for them (the local
        # provider's one node type, also the head's, counts as launchable: placement.node_types); the test
        # waits first anyway, asking the cluster through the launcher, to tell a worker that never joins
        # apart from a run that fails.
        alive = "import ray; ray.init(address='auto', logging_level='ERROR'); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
        start = time.monotonic()
        while True:
            nodes = re.findall(r"ALIVE (\d+)", launcher("status", "exec", str(config), f'python -c "{alive}"'))
            if nodes and int(nodes[-1]) == 1 + len(WORKERS):
                break
            assert time.monotonic() - start < 1800, f"the workers did not join: {nodes}"
            time.sleep(10)
        timings["workers_joined"] = time.monotonic() - start

        runs = machines.shared / "runs" / "train"
        out = launcher("train", "submit", str(config), "cluster/submit.py", "--", "train", "--workers", "1",
                       "--out", str(runs), *TINY)  # fmt: skip
        assert f"tracking to the head's MLflow server: --set tracking.uri=http://{HEAD}:{machines.mlflow_port}" in out
        result = json.loads((runs / "result.json").read_text())
        assert result["steps"] == STEPS and result["workers"] == 1
        # the head's server as local.yaml starts it: MLflow without its job runner (huey consumers)
        server = [c for c in (_cmdline(p).replace(b"\0", b" ") for p in machines.pids()) if b"mlflow" in c]
        assert any(b"mlflow server" in c for c in server), server
        assert not [c for c in server if b"huey" in c or b"_job_" in c], server

        sweeps = machines.shared / "sweeps"
        out = launcher("tune", "submit", str(config), "cluster/submit.py", "--", "tune", "--space",
                       "tune_spaces/sinusoid.yaml", "--trials", "1", "--storage", str(sweeps),
                       *TINY, "--set", "meta.checkpoint_every=2", "--set", "tracking.log_every=1")  # fmt: skip
        assert list(sweeps.iterdir()), out[-3000:]

        launcher("down", "down", "-y", str(config))
        timings["journey"] = time.monotonic() - journey
        print("launcher journey (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))

        # ray down stopped Ray on the head (its `ray stop`, this machine's stop-ray-node)
        head_tmp = f"TMPDIR={machines.tmp[HEAD]}".encode()
        left = [p for p in machines.pids() if head_tmp in _environ(p) and b"raylet" in _cmdline(p)]
        assert left == []
    finally:
        _keep_logs(machines, tmp_path)
        machines.stop()
    assert machines.pids() == []  # every process of the throwaway user ended


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _keep_logs(machines: Machines, to: Path) -> None:
    """MLflow's log and the Ray logs of every "machine", for a failure's diagnosis (stop() removes them)."""
    mlflow = machines.homes[HEAD] / "mlflow" / "server.log"
    try:
        if mlflow.exists():
            shutil.copy(mlflow, to / "mlflow.log")
        for address, tmp in machines.tmp.items():
            for logs in tmp.glob("ray/session_2*/logs"):
                shutil.copytree(logs, to / f"ray-logs-{address}", dirs_exist_ok=True)
    except OSError as e:  # a log rotated away while copied: not the test's outcome
        print(f"not all logs kept: {e}")
