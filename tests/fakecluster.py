"""A local autoscaling Ray cluster shaped like ``cluster/config.yaml``, for tests.

The head is a real ``ray start --head --num-cpus=0`` with Ray's fake
multi-node node provider (``RAY_FAKE_CLUSTER=1``, ``provider: {type:
fake_multinode}``): its autoscaler "launches" a worker node by starting one
more raylet on this machine, with the resources of the node type it chose, and
stops it again after the idle timeout. The default node types mirror
``cluster/config.yaml``: a head that offers no CPUs and one GPU node type,
``gpu_worker`` (2 CPUs, 1 fake GPU: resources only), with ``min_workers: 0``,
so no worker node is up until a run asks for one.

Use (see ``tests/test_autoscale.py``)::

    from fakecluster import start_fake_cluster

    cluster = start_fake_cluster()          # returns once the head answers; no worker node yet
    try:
        subprocess.run([...], env=cluster.env)   # RAY_ADDRESS and the auth token of this cluster
        with cluster.joined():                   # this process as a driver of the cluster (ray.init)
            ...
        cluster.worker_nodes()                   # raylets the autoscaler started so far
    finally:
        cluster.stop()                           # by pid: this cluster's processes only

It is ``tests/rayhead.py``'s head with an autoscaling config: free ports, a
private ``--temp-dir``, token auth, its own session, stopped by pid. Never
``ray stop``, and not ``ray.cluster_utils.AutoscalingCluster``: both end every
Ray process on the machine (and the latter's ``example.yaml`` is missing from
the Ray 2.60 wheel, so the config is written here in full).

Two such clusters on one machine at once: what was checked in Ray 2.60's
``fake_multi_node/node_provider.py`` and ``_private/node.py``.

- Worker nodes take the head's temp dir (from the GCS), so their sockets and
  logs stay under this cluster's private ``--temp-dir``, not ``/tmp/ray``.
- The provider reaches the GCS at ``provider.gcs_address``, written here with
  this head's port (without it, it would assume port 6379).
- Node ids are fixed by the provider (head ``fff...f00000``, workers
  ``fff...f00001`` and up) in every fake cluster; they are ids within one GCS,
  so two clusters do not clash, but do not compare node ids across clusters.
- The worker raylets are started by the head's autoscaler process, so they
  live in the head's session and ``stop()`` ends them with the head.
- Tried: two clusters started at once, each asked by its own driver for two
  ``gpu_worker`` nodes, each got its own two, and neither wrote under
  ``/tmp/ray`` (nodes come up in about 10 s on this 2-core machine).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayhead import RayHead, free_port, new_temp_dir, start_head

from distmaml.machine.environ import environ

HEAD_TYPE = "ray.head.default"  # the fake provider tags its head node with this type name
GPU_WORKER = {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 2}


@dataclass
class FakeCluster:
    head: RayHead
    config: dict[str, Any]
    """The autoscaling config the head was started with."""

    @property
    def address(self) -> str:
        return self.head.address

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients: RAY_ADDRESS and the auth token."""
        return self.head.env

    def worker_nodes(self) -> int:
        """Worker nodes running now: raylets of this cluster besides the head's."""
        raylets = 0
        for pid in self.head.pids():
            try:
                exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except FileNotFoundError:
                continue
            raylets += exe.endswith(b"/raylet")
        return max(0, raylets - 1)

    def wait_for_worker_nodes(self, count: int, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.worker_nodes()) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return n

    @contextmanager
    def joined(self) -> Iterator[None]:
        """This process joined to the cluster (``ray.init``) with its token, both undone on exit."""
        import ray
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        def refresh() -> None:
            # Ray caches its auth settings and the token itself when it loads or first uses them: a
            # later local instance in this process would otherwise send this cluster's token.
            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()

        try:
            with environ({k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}):
                refresh()
                try:
                    ray.init(address=self.address, logging_level="WARNING")
                    yield
                finally:
                    ray.shutdown()
        finally:
            refresh()  # after the variables are put back

    def stop(self) -> None:
        self.head.stop()


def start_fake_cluster(
    worker_types: dict[str, dict[str, Any]] | None = None,
    max_workers: int = 2,
    idle_timeout_minutes: float = 5.0,
    timeout: float = 120.0,
    *,
    config_path: Path | None = None,
    file_mounts: dict[str, str] | None = None,
    dashboard_port: int | None = None,
) -> FakeCluster:
    """Starts the head (0 CPUs) with an autoscaler that may launch ``worker_types`` (default: ``gpu_worker``).

    ``worker_types`` maps a node type name to its ``resources``,
    ``min_workers`` and ``max_workers``, as in ``available_node_types`` of a
    cluster YAML; ``max_workers`` bounds all worker nodes together.
    ``config_path``: where to write the autoscaling config (``ray up`` writes
    it to the head's ``~/ray_bootstrap_config.yaml``, each of ``file_mounts``'
    targets mapped to itself); ``dashboard_port``: start the dashboard there
    (the Jobs API), on 127.0.0.1.
    """
    types = {name: {"node_config": {}, **spec} for name, spec in (worker_types or {"gpu_worker": GPU_WORKER}).items()}
    types[HEAD_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    temp_dir = new_temp_dir()
    port = free_port()
    config: dict[str, Any] = {
        "cluster_name": f"fake-{temp_dir.name}",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "disable_node_updaters": True,  # no SSH: the provider starts raylets itself
            "disable_launch_config_check": True,
        },
        "auth": {},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": dict(file_mounts or {}),
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    config_path = config_path or temp_dir / "autoscaling.json"  # JSON is YAML: `ray start` reads either
    config_path.write_text(json.dumps(config, indent=1))
    dashboard = [
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
    ]
    head = start_head(
        num_cpus=0,
        timeout=timeout,
        port=port,
        temp_dir=temp_dir,
        extra_args=[f"--autoscaling-config={config_path}", *(dashboard if dashboard_port else [])],
        extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    return FakeCluster(head, config)
