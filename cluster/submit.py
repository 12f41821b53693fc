"""Runs a distmaml command on a Ray cluster: the entry script for ``ray submit``.

    ray submit cluster/config.yaml cluster/submit.py -- train --config sinusoid --workers 4 \\
        --out s3://YOUR-BUCKET/runs/a

``ray submit`` copies this one file to the head node's home folder and runs
``python ~/submit.py ARGS`` there, from the home folder, so it stands alone:
distmaml comes from the package that ``setup_commands`` installed on every node.

It moves into the project folder the cluster YAML mounts (``file_mounts:
~/distmaml: .``), so that every relative path of the command (``--space``,
``--config``, ``--out``, ``data.path``, a package of your own) resolves as in
your checkout, then runs ``distmaml train|tune|evaluate ...`` as a driver of the
cluster: joined to it (``RAY_ADDRESS`` or ``auto``), shipping your own model and
task family to every node, tracking to the head's MLflow server when you name
no ``tracking.uri``. ``distmaml.oncluster`` holds all of it; ``ray job submit
... -- distmaml ...`` (the Jobs API) gets the same.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on the path; under `ray submit` that is the head's home folder,
# whose ~/distmaml (the project, mounted there) would shadow the installed package as a namespace package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        import distmaml.cli
        from distmaml.oncluster import COMMANDS, enter_project
    except ImportError as e:
        print(
            f"submit.py: error: distmaml is not installed on this node ({e}); "
            "check setup_commands in the cluster YAML ('pip install -e ~/distmaml') and rerun 'ray up'",
            file=sys.stderr,
        )
        return 2
    enter_project()  # before anything resolves a path
    return distmaml.cli.main(argv, on_cluster=bool(argv) and argv[0] in COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
