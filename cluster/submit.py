"""Runs a distmaml command on a Ray cluster: the entry script for ``ray submit``.

    ray submit cluster/config.yaml cluster/submit.py -- train --config sinusoid --workers 4 \\
        --out s3://YOUR-BUCKET/runs/a --set tracking.uri=http://127.0.0.1:5000

``ray submit`` copies this one file to the head node and runs it there with
the arguments after ``--``, so it stands alone: distmaml comes from the package
that ``setup_commands`` installed on every node, not from files beside it.

It joins the running cluster first (``RAY_ADDRESS`` where set, else
``address="auto"``: the cluster ``ray start`` started on this node), failing in
seconds with one line if none answers; then it runs exactly what
``distmaml train|tune|evaluate ...`` would run, passing ``--address`` on to the
subcommands that take one, so their engines join the same cluster.
"""

from __future__ import annotations

import os
import sys


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
        try:
            joined = connect(address)
        except ClusterError as e:
            print(f"distmaml: error: {e}", file=sys.stderr)
            return 2
        import ray

        resources = {k: v for k, v in sorted(ray.cluster_resources().items()) if "node:" not in k}
        print(f"submit.py: joined the Ray cluster at {joined}: {resources}", flush=True)
        argv = _with_address(argv, address)
    return distmaml.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
