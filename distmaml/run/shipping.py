"""Ships the user's own code to every Ray worker: the packages that ``model.name`` / ``data.family`` name.

A model or task family given as ``package.module:attr`` (or a callable given
to ``distmaml.train``, whose module is pickled by reference) must import on
every node. Rather than asking the user to install it there, the driver
copies the top-level package of each (``package/``, or ``module.py`` when the
import path names a plain module) into a fresh folder and hands that folder
to Ray as the job's runtime environment ``working_dir``: Ray zips it, stores
it in the cluster's GCS and unpacks it on each node before a worker starts
there; workers run in it and import from it. Only those packages travel,
never the current directory with its runs, data and checkpoints.

Why ``working_dir`` of a copy, not ``py_modules``: with ``py_modules`` alone
Ray still puts the driver's current directory at the front of every worker's
``sys.path`` (``ray._private.worker.connect``), so on the driver's own node a
worker imports the folder's files by chance rather than what was shipped;
with a ``working_dir`` it does not. The copy is taken once per process, so
workers started later (replacements after a failure) get the code the run
started with.

Inside a Ray job whose runtime environment has a ``working_dir`` already
(``ray job submit --working-dir . -- distmaml train ...``), the job's folder
is the shipped code: the entrypoint runs in Ray's unpacked copy of it and
every worker of the job gets the same copy, and Ray refuses a second
``working_dir`` from ``ray.init``. The user's packages are then found in that
folder and nothing more is shipped; one found outside it is refused in one
line, naming the folder to move it into.

Not shipped: packages installed in the interpreter's site-packages (install
them on every node, as the cluster YAML's ``setup_commands`` install
distmaml) and distmaml itself. Ray refuses a package of 512 MiB or more
(its gRPC message limit) and warns from 10 MiB per file: keep data out of the
package (a task store at ``data.path``).
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from distmaml.config import Config, is_import_path
from distmaml.run.usercode import UserCodeError, resolve

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".ipynb_checkpoints")
_staged: dict[tuple[str, ...], Path] = {}


def _installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths[k]).resolve() for k in ("purelib", "platlib", "stdlib", "platstdlib") if k in paths]


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def top_level_sources(modules: Iterable[str]) -> list[Path]:
    """The folder (package) or file (module) of each top-level module to ship; installed ones are left out."""
    roots = _installed_roots()
    found: dict[str, Path] = {}
    for name in modules:
        top = name.split(".")[0]
        if top in found or top in ("__main__", "distmaml") or top in sys.builtin_module_names:
            continue
        module = sys.modules.get(top) or importlib.import_module(top)
        paths = list(getattr(module, "__path__", None) or [])
        if len(paths) > 1:
            raise UserCodeError(
                f"the package {top!r} spans {len(paths)} folders (a namespace package); give it an __init__.py "
                "so that one folder can be shipped to the workers"
            )
        origin = Path(paths[0]) if paths else Path(getattr(module, "__file__", None) or "")
        if not str(origin) or not origin.exists() or _within(origin.resolve(), roots):
            continue
        found[top] = origin.resolve()
    return [found[k] for k in sorted(found)]


def user_modules(
    config: Config, model: Callable[..., Any] | None = None, tasks: Callable[..., Any] | None = None
) -> list[str]:
    """Modules holding the user's code: those of the config's import paths, or of the callables given instead.

    A callable travels inside the worker's task program by cloudpickle: by
    value when defined in ``__main__`` (a notebook, a script) or inside a
    function, else by reference to its module, which then has to be shipped.
    """
    names = []
    for key, value, fn in (("model.name", config.model.name, model), ("data.family", config.data.family, tasks)):
        if fn is not None:
            module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
            if module and module != "__main__" and "<locals>" not in qualname:
                names.append(module)
        elif is_import_path(value):
            resolve(key, value)  # imported on the driver first: a bad path is one line here, not a dead worker
            names.append(value.partition(":")[0])
    return names


def stage(sources: list[Path]) -> Path:
    """A folder holding a copy of each source (package folder or module file), made once per process."""
    key = tuple(str(s) for s in sources)
    if key not in _staged:
        folder = Path(tempfile.mkdtemp(prefix="distmaml-code-"))
        atexit.register(shutil.rmtree, folder, True)
        for src in sources:
            if src.is_dir():
                shutil.copytree(src, folder / src.name, ignore=_IGNORE)
            else:
                shutil.copy2(src, folder / src.name)
        _staged[key] = folder
    return _staged[key]


def runtime_env(
    config: Config, model: Callable[..., Any] | None = None, tasks: Callable[..., Any] | None = None
) -> dict[str, Any] | None:
    """The job's runtime environment for ``config``'s run: ``{"working_dir": copy of the user's packages}``, or None.

    Example:
        >>> runtime_env(load_config("sinusoid", ["model.name=quad.nets:make"]))
        {'working_dir': '/tmp/distmaml-code-1a2b3c'}
    """
    sources = top_level_sources(user_modules(config, model, tasks))
    if not sources:
        return None
    from distmaml.cluster.connect import job_runtime_env

    job = job_runtime_env()
    if job is not None and job.get("working_dir"):
        _check_in_job_folder(sources)
        return None  # the job's own working_dir carries them
    return {"working_dir": str(stage(sources))}


def _check_in_job_folder(sources: list[Path]) -> None:
    """Raises unless every source is inside the Ray job's ``working_dir`` (the entrypoint's folder)."""
    here = Path.cwd().resolve()
    outside = [s for s in sources if not _within(s, [here])]
    if outside:
        raise UserCodeError(
            f"{outside[0]} is outside the Ray job's working directory, which is the only code the job "
            f"ships to its workers; move {outside[0].name!r} into the folder you pass as --working-dir"
        )
