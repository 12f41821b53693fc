"""Tests reach loopback only: 127.0.0.0/8, never the address of this machine's network interface.

Three checks: no test asks for this machine's network address (the ways to get it, grepped); the socket
audit of tests/conftest.py, which fails the session if the pytest process connects, binds or sends
anywhere else, tells the two apart; and a Ray head as the tests start it listens on loopback only (Ray
alone would take the default route's address, tests/rayhead.py's LOOPBACK_ONLY). tests/test_journey.py
checks the same on a whole autoscaling cluster with its dashboard.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import ray
from conftest import _is_loopback
from rayhead import listening_addresses, start_head

TESTS = Path(__file__).resolve().parent
FORBIDDEN = [
    r"""["']hostname["'],\s*["']-I["']""",  # subprocess.run(["hostname", "-I"])
    r"hostname -I",
    r"gethostbyname\(",
    r"gethostname\(\)",
    r"get_node_ip_address\(\)",
    r"""["']0\.0\.0\.0["']""",  # a bind to every interface
]
ALLOWED = {  # they check or rewrite the cluster YAML's text (what a real head runs); the first also that it binds
    # nothing to every interface
    "test_cluster_config.py": [r"hostname -I", r"""["']0\.0\.0\.0["']"""],
    "test_launcher.py": [r"hostname -I"],
}


def test_no_test_asks_for_this_machines_network_address():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in FORBIDDEN:
                if re.search(pattern, line) and pattern not in ALLOWED.get(path.name, []):
                    found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.3", True),
        ("::1", True),
        ("::ffff:127.0.0.2", True),
        ("localhost", True),
        ("192.0.2.2", False),
        ("10.0.0.9", False),
        ("0.0.0.0", False),
        ("", False),
        ("example.org", False),
    ],
)
def test_the_socket_audit_tells_loopback_from_the_rest(host, loopback):
    assert _is_loopback(host) is loopback


def test_a_ray_head_as_tests_start_it_listens_on_loopback_only():
    head = start_head(num_cpus=0)
    try:
        listening = listening_addresses(head.pids())
        assert listening  # the GCS, the raylet, the agents
        off = {a: c for a, c in listening.items() if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback}
        assert off == {}
        import json
        import subprocess
        import sys

        nodes = subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(); print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes()]))"],
            env=head.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert json.loads(nodes.stdout.strip().splitlines()[-1]) == ["127.0.0.1"], nodes.stderr[-2000:]
    finally:
        head.stop()
    assert not ray.is_initialized()
