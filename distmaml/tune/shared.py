"""What every node of a sweep must reach: Tune's storage and the MLflow tracking server.

On a cluster a trial runs on whichever node holds its placement group, and a
trial restarted after a crash or a lost node may run on another one. It then
finds its last checkpoint only in storage that every node reads (a bucket),
and its child run only on a tracking server that every node reaches (not a
SQLite file, not a loopback address). This module resolves ``--storage`` for
Tune and refuses, before any trial starts, a ``tracking.uri`` that trials
could not reach from where they may run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmaml import storage as store
from distmaml.config import ConfigError
from distmaml.storage import Location


@dataclass(frozen=True)
class TuneStorage:
    """``--storage`` as Tune's ``RunConfig`` takes it, and how to name what Tune writes there."""

    location: Location
    path: str
    """``storage_path``: a local folder, or the path inside ``filesystem`` (``bucket/prefix``)."""
    filesystem: Any = None
    """``storage_filesystem``: the ``pyarrow`` filesystem of a URI (None: local)."""
    scheme: str = ""

    def locate(self, path: str) -> Location:
        """A path Tune reports (a checkpoint) as ``distmaml.storage`` names it: a folder or a URI."""
        return f"{self.scheme}://{path}" if self.scheme else path


def tune_storage(where: str | Path) -> TuneStorage:
    """Resolves and probes ``--storage``: a folder, or an ``s3://``/``gs://``/any pyarrow URI shared by all nodes.

    The filesystem comes from ``distmaml.storage`` (so an S3 endpoint set with
    ``AWS_ENDPOINT_URL`` or ``DISTMAML_S3_ENDPOINT`` applies) and travels with
    each trial to its node. A location that cannot be written fails here, in
    one line naming ``--storage``, before any trial starts.
    """
    loc = store.location(where)
    store.check_writable(loc, "--storage")  # named as given in the message
    if isinstance(loc, Path):
        loc = loc.expanduser().resolve()
        return TuneStorage(loc, str(loc))
    fs, path = store.resolve(loc)
    return TuneStorage(loc, path, fs, loc.split("://", 1)[0])


def other_machines() -> str | None:
    """Why trials of a sweep started here may run on another machine than this driver's, or None.

    They may when a node up has another address, or when the autoscaler can
    launch nodes (a cloud, a lab's machines), except Ray's fake multi-node
    provider, whose nodes are processes on this machine, and the ``local``
    provider when every address it may start a node at (``worker_ips``) is
    this machine's (``same_machine``: loopback addresses standing for machines).
    """
    import ray

    from distmaml.cluster.placement import _autoscaling_config, launchable_node_types

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    me = ray.get_runtime_context().get_node_id()  # the driver's node, as the cluster addresses it
    here = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me), ray.util.get_node_ip_address())
    for node in nodes:
        if not same_machine(node["NodeManagerAddress"], here):
            return f"node {node['NodeManagerAddress']} is another machine than this driver's {here}"
    types, _ = launchable_node_types()
    if types:
        config = _autoscaling_config(ray.get_runtime_context().gcs_address) or {}
        return launched_elsewhere(config, [t.name.removeprefix("node type ") for t in types], here)
    return None


def launched_elsewhere(config: dict[str, Any], types: list[str], here: str) -> str | None:
    """Why nodes the autoscaler of ``config`` (its cluster file) may launch of ``types`` may be another
    machine than ``here``, the driver's address, or None.

    Example:
        >>> local = {"provider": {"type": "local", "head_ip": "127.0.0.2", "worker_ips": ["127.0.0.3"]}}
        >>> launched_elsewhere(local, ["local.cluster.node"], "127.0.0.2") is None
        True
        >>> launched_elsewhere({"provider": {"type": "aws"}}, ["gpu_worker"], "10.0.0.10")
        'the autoscaler can launch nodes of type gpu_worker (provider aws)'
    """
    provider = config.get("provider") or {}
    kind = provider.get("type", "unknown")
    if kind == "fake_multinode":
        return None
    if kind == "local" and all(same_machine(str(ip), here) for ip in provider.get("worker_ips") or []):
        return None
    return f"the autoscaler can launch nodes of type {', '.join(types)} (provider {kind})"


def same_machine(a: str, b: str) -> bool:
    """Whether Ray nodes at addresses ``a`` and ``b`` are on one machine, as far as the addresses tell.

    Equal addresses are; so are two loopback addresses (127.0.0.0/8, ::1): a node reached
    at a loopback address is reached from its own machine only, so nodes of one cluster that
    reach each other there (several raylets on one machine, each at its own 127.x address)
    share it.

    Example:
        >>> same_machine("127.0.0.2", "127.0.0.3"), same_machine("10.0.0.10", "10.0.0.11")
        (True, False)
    """
    import ipaddress

    def loopback(address: str) -> bool:
        try:
            return ipaddress.ip_address(address).is_loopback
        except ValueError:
            return address == "localhost"

    return a == b or (loopback(a) and loopback(b))


def check_tracking_reach(uri: str, elsewhere: str | None) -> None:
    """Refuses a ``tracking.uri`` that trials on other machines could not reach, when they may run there."""
    from distmaml.tracking.uri import machine_local

    why = machine_local(uri)
    if why and elsewhere:
        raise ConfigError(
            f"tracking.uri = {uri!r}: {why}, but trials may run on other machines ({elsewhere}); "
            "use a tracking server every node reaches: --set tracking.uri=http://HEAD_PRIVATE_IP:5000 "
            "(cluster/submit.py fills it in), or tracking.enabled=false"
        )
