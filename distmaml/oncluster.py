"""A command run on a Ray cluster's head, by either door: ``ray submit`` (``cluster/submit.py``) or a Ray job.

Both doors run ``distmaml train|tune|evaluate`` as a driver on the head node
(``ray submit`` runs ``python ~/submit.py ARGS`` there over SSH; the Jobs API
starts a job's entrypoint on the head by default), and both get the same
preparation, in ``distmaml.cli`` through the functions here:

- **where it runs.** ``ray submit`` starts in the head's home folder, while
  the cluster YAML mounts the project elsewhere (``file_mounts: ~/distmaml:
  .``). ``enter_project`` moves into that folder before anything resolves a
  path, so ``--space tune_spaces/...``, ``--config FILE.yaml``, ``--out``,
  ``data.path: data/omniglot`` and a user package beside the project resolve
  as in the user's checkout. The folder is read from the mount itself (the
  head's ``~/ray_bootstrap_config.yaml``, which ``ray up`` writes with every
  mount's target), so the YAML keeps the one setting. A Ray job already runs
  in its ``--working-dir`` (Ray's unpacked copy).
- **joining the cluster** (``join``): ``RAY_ADDRESS`` (a job's, or the
  user's) or ``auto``, failing in seconds with one line if none answers, with
  the runtime environment that ships the user's own model and task family
  (``distmaml.run.shipping``; inside a job whose ``working_dir`` holds them,
  nothing more is shipped).
- **the head's MLflow server** (``head_tracking_uri``): for ``train`` and
  ``tune`` without a ``tracking.uri`` of the user's, the server the cluster
  YAML starts on the head's private address, port 5000
  (``DISTMAML_MLFLOW_PORT``), if it answers.
- **waiting for the autoscaler**: nothing here; the engine does it
  (``distmaml.cluster.placement``), and reads the node types the head's
  autoscaler may launch from this node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from distmaml.config import Config, TrackingConfig

MLFLOW_PORT_ENV = "DISTMAML_MLFLOW_PORT"
PROBE_TIMEOUT = 2.0
"""Seconds to wait for the head's MLflow server to accept a connection."""
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"
"""The cluster config ``ray up`` writes into the head's home folder, each file mount mapped to its target."""
DEFAULT_PROJECT = "distmaml"
"""The project's folder under the home folder when no bootstrap config names one."""
COMMANDS = ("train", "tune", "evaluate")
"""The subcommands that join the cluster."""


def _expand(path: str, home: Path) -> Path:
    return home / path[2:] if path.startswith("~/") else Path(path)


def project_folder(home: Path | None = None) -> Path | None:
    """The project folder the cluster YAML mounts on this node, or None.

    The mounts of ``~/ray_bootstrap_config.yaml`` (which ``ray up`` writes on
    the head, each target mapped to itself) are searched for the folder that
    holds ``cluster/submit.py``: the project this script came from. Without
    that file (a head not made by ``ray up``), ``~/distmaml`` if it exists.
    """
    home = home if home is not None else Path.home()
    candidates = []
    try:
        loaded = yaml.safe_load((home / BOOTSTRAP_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        loaded = None
    if isinstance(loaded, dict) and isinstance(loaded.get("file_mounts"), dict):
        candidates = [_expand(str(target), home) for target in loaded["file_mounts"]]
        found = [c for c in candidates if (c / "cluster" / "submit.py").is_file()]
        if found:
            return found[0]
    fallback = home / DEFAULT_PROJECT
    return fallback if fallback.is_dir() else None


def enter_project(home: Path | None = None) -> Path | None:
    """Moves into ``project_folder()``, saying so; returns it (None: stays where it is, says that too)."""
    folder = project_folder(home)
    if folder is None:
        print(
            f"distmaml: no project folder mounted on this node (no file mount holding cluster/submit.py in "
            f"~/{BOOTSTRAP_CONFIG}, no ~/{DEFAULT_PROJECT}); running in {os.getcwd()}",
            flush=True,
        )
        return None
    os.chdir(folder)
    print(f"distmaml: running in the project folder {folder}", flush=True)
    return folder


def cluster_address(given: str | None) -> str:
    """The address a command on the cluster joins: ``--address``, else ``RAY_ADDRESS``, else ``auto``."""
    return given or os.environ.get("RAY_ADDRESS") or "auto"


def join(address: str, config: Config | None) -> str:
    """Joins the cluster at ``address`` with the job's runtime environment for ``config``'s user code.

    Prints the address joined and the cluster's resources; raises
    ``ClusterError`` (one line) when no cluster answers there.
    """
    import ray

    from distmaml.cluster.connect import connect

    env = _runtime_env(config)
    joined = connect(address, runtime_env=env) if env else connect(address)
    resources = {k: v for k, v in sorted(ray.cluster_resources().items()) if "node:" not in k}
    print(f"distmaml: joined the Ray cluster at {joined}: {resources}", flush=True)
    return joined


def _runtime_env(config: Config | None) -> dict[str, Any] | None:
    """The runtime environment shipping the user's model and task family, set when joining, so that the
    engine's actors, Ray Train workers and Tune trials of the command all inherit it."""
    from distmaml.errors import DistmamlError
    from distmaml.run.assembly import user_runtime_env

    if config is None:
        return None
    try:
        return user_runtime_env(config)
    except DistmamlError:  # an import path that does not resolve: the command reports it in one line
        return None


def tracks_to_default(config: Config | None, overrides: list[str]) -> bool:
    """True when ``config`` tracks to MLflow at the default URI and the user named none in ``overrides``."""
    if config is None or any(o.startswith("tracking.uri=") for o in overrides):
        return False  # named, even if it is the default
    return config.tracking.enabled and config.tracking.uri == TrackingConfig().uri


def head_ip() -> str:
    """The head node's address in the cluster (its private IP on a cloud), as Ray knows it."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())  # the driver runs on the head under either door


def head_tracking_uri() -> str | None:
    """``http://HEAD_IP:PORT`` when the head's MLflow server answers there, else None; says which."""
    from distmaml.cluster.reach import unreachable

    host, port = head_ip(), int(os.environ.get(MLFLOW_PORT_ENV) or 5000)
    why = unreachable(host, port, PROBE_TIMEOUT)
    if why is not None:
        print(
            f"distmaml: no MLflow server answers at {host}:{port} ({why}); tracking stays at the "
            "default sqlite:///mlflow.db on this node (start one as cluster/config.yaml's head_start_ray_commands "
            f"do, or pass --set tracking.uri=...)",
            flush=True,
        )
        return None
    uri = f"http://{host}:{port}"
    print(f"distmaml: tracking to the head's MLflow server: --set tracking.uri={uri}", flush=True)
    return uri
