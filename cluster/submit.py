"""Runs a distmaml command on a Ray cluster: the entry script for ``ray submit``.

    ray submit cluster/config.yaml cluster/submit.py -- train --config sinusoid --workers 4 \\
        --out s3://YOUR-BUCKET/runs/a

``ray submit`` copies this one file to the head node and runs it there with
the arguments after ``--``, so it stands alone: distmaml comes from the package
that ``setup_commands`` installed on every node, not from files beside it.

It joins the running cluster first (``RAY_ADDRESS`` where set, else
``address="auto"``: the cluster ``ray start`` started on this node), failing in
seconds with one line if none answers, with the runtime environment that
ships the user's own model and task family (``model.name: pkg.mod:attr``) to
every node; then it runs exactly what
``distmaml train|tune|evaluate ...`` would run, passing ``--address`` on to the
subcommands that take one, so their engines join the same cluster.

Tracking: for ``train`` and ``tune`` without a ``tracking.uri`` of the user's
(and with tracking on), it looks for the MLflow server that the cluster YAML
starts on the head, on the head's private address (from Ray) and port 5000
(``DISTMAML_MLFLOW_PORT``), and passes ``--set tracking.uri=http://HEAD_IP:5000``:
an address that the driver and trials on every node reach. If none answers
within a second or two, it says so and keeps the default (a SQLite file, which
a sweep across machines then refuses).
"""

from __future__ import annotations

import os
import sys
from typing import Any

MLFLOW_PORT_ENV = "DISTMAML_MLFLOW_PORT"
PROBE_TIMEOUT = 2.0


def _with_address(argv: list[str], address: str) -> list[str]:
    """``argv`` with ``--address ADDRESS`` after the subcommand, if it takes one and none is given."""
    from distmaml.cli import build_parser

    if not argv or any(a == "--address" or a.startswith("--address=") for a in argv):
        return argv
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")  # argparse keeps no public accessor
    sub = subparsers.choices.get(argv[0])  # type: ignore[union-attr]
    if sub is None or "--address" not in sub._option_string_actions:
        return argv
    return [argv[0], "--address", address, *argv[1:]]


def _config(argv: list[str]) -> Any:
    """The config a ``train`` (a resumed one: its checkpoint's) or ``tune`` command line runs, else None."""
    from distmaml.cli import build_parser
    from distmaml.config import load_config

    try:
        args = build_parser().parse_args(argv)
        if args.command == "train" and not args.resume:
            return load_config(args.config, list(args.set or []))
        if args.command == "tune":
            from distmaml.tune import load_space, with_overrides

            return with_overrides(load_space(args.space), overrides=list(args.set or [])).base_config()
        if args.command == "train":
            from distmaml.checkpoint import load_checkpoint
            from distmaml.config import config_from_dict

            return config_from_dict(load_checkpoint(args.resume).config)
    except (Exception, SystemExit):  # a bad command line: distmaml reports it below, in its own words
        return None
    return None


def _default_tracking(argv: list[str]) -> bool:
    """True when ``train``/``tune`` ``argv`` tracks to MLflow at the default URI: the user named none."""
    from distmaml.config import TrackingConfig

    if any(a.startswith(("tracking.uri=", "--set=tracking.uri=")) for a in argv):
        return False  # named, even if it is the default
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return False  # the run keeps its own config
    config = _config(argv)
    return config is not None and config.tracking.enabled and config.tracking.uri == TrackingConfig().uri


def _runtime_env(argv: list[str]) -> dict[str, Any] | None:
    """The job's runtime environment shipping the user's model and task family (``model.name: pkg.mod:attr``).

    Set when this script joins the cluster, so the engine's actors, Ray Train
    workers and Tune trials of the command all inherit it.
    """
    from distmaml.assembly import user_runtime_env
    from distmaml.errors import DistmamlError

    config = _config(argv)
    if config is None:
        return None
    try:
        return user_runtime_env(config)
    except DistmamlError:  # an import path that does not resolve: the command reports it in one line
        return None


def _head_ip() -> str:
    """The head node's address in the cluster (its private IP on a cloud), as Ray knows it."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())  # submit.py runs on the head under ray submit


def _with_head_tracking(argv: list[str]) -> list[str]:
    """``argv`` with ``--set tracking.uri=http://HEAD_IP:PORT`` when the head's MLflow server answers there."""
    if argv[:1] not in (["train"], ["tune"]) or not _default_tracking(argv):
        return argv
    from distmaml.reach import unreachable

    host, port = _head_ip(), int(os.environ.get(MLFLOW_PORT_ENV) or 5000)
    why = unreachable(host, port, PROBE_TIMEOUT)
    if why is not None:
        print(
            f"submit.py: no MLflow server answers at {host}:{port} ({why}); tracking stays at the "
            "default sqlite:///mlflow.db on this node (start one as cluster/config.yaml's head_start_ray_commands "
            f"do, or pass --set tracking.uri=...)",
            flush=True,
        )
        return argv
    uri = f"http://{host}:{port}"
    print(f"submit.py: tracking to the head's MLflow server: --set tracking.uri={uri}", flush=True)
    return [*argv, "--set", f"tracking.uri={uri}"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        import distmaml.cli
        from distmaml.raycluster import ClusterError, connect
    except ImportError as e:
        print(
            f"submit.py: error: distmaml is not installed on this node ({e}); "
            "check setup_commands in the cluster YAML ('pip install -e ~/distmaml') and rerun 'ray up'",
            file=sys.stderr,
        )
        return 2
    address = os.environ.get("RAY_ADDRESS") or "auto"
    if argv and argv[0] in ("train", "tune", "evaluate"):
        env = _runtime_env(argv)
        try:
            joined = connect(address, **({"runtime_env": env} if env else {}))
        except ClusterError as e:
            print(f"distmaml: error: {e}", file=sys.stderr)
            return 2
        import ray

        resources = {k: v for k, v in sorted(ray.cluster_resources().items()) if "node:" not in k}
        print(f"submit.py: joined the Ray cluster at {joined}: {resources}", flush=True)
        argv = _with_head_tracking(_with_address(argv, address))
    return distmaml.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
