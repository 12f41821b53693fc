"""Guards on the cluster address: a wrong --address fails in seconds with one clear line."""

from __future__ import annotations

import socket
import time

import pytest

from distmaml.cluster.connect import ClusterError, connect, probe, resolve, split_address


def test_address_forms():
    assert split_address("10.0.0.9:6379") == ("10.0.0.9", 6379)
    assert split_address("ray://head.example.org") == ("head.example.org", 10001)
    assert split_address("ray://head:10002") == ("head", 10002)
    for bad in ("nonsense", "head:", "head:port"):
        with pytest.raises(ClusterError, match="expected local, auto, host:port or ray://host:port"):
            split_address(bad)


def test_resolve_uses_ray_address_for_auto_and_default(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve(None) == "local" and resolve("local") == "local" and resolve("10.0.0.9:6379") == "10.0.0.9:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert resolve("auto") == resolve(None) == "10.0.0.7:6379"
    assert resolve("local") == "local"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("form", ["{}", "ray://{}"])
def test_refused_address_fails_at_once(form):
    import ray  # noqa: F401  (imported before timing: connect imports it)

    address = form.format(f"127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"no Ray cluster answers at 127\.0\.0\.1:\d+ \(Connection refused") as e:
        connect(address)
    assert time.monotonic() - start < 1.0
    assert str(e.value).startswith(f"--address {address}: ") and "--address local" in str(e.value)


def test_silent_address_fails_after_the_probe_timeout():
    # A listener whose accept queue is full drops further SYNs, as a firewall or a dead host does.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    pending = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        pending.append(c)
    try:
        time.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(ClusterError, match="timed out after 1.0 s"):
            probe(f"127.0.0.1:{port}", timeout=1.0)
        assert 0.9 < time.monotonic() - start < 3.0
    finally:
        for c in pending:
            c.close()
        server.close()
