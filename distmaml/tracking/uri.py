"""The MLflow tracking URI, made absolute once, before any worker or trial sees it.

``sqlite:///mlflow.db`` names a file relative to the current directory. A Ray
trial or worker runs in another directory, so a relative URI would scatter
runs over several databases; ``absolute_uri`` pins it to the driver's working
directory. MLflow 3 no longer accepts a plain folder (``./mlruns``) as a
tracking store, so folders and ``file:`` URIs are refused with a fix.
"""

from __future__ import annotations

from pathlib import Path

from distmaml.config import ConfigError

_REMOTE = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")


def absolute_uri(uri: str, cwd: Path | None = None) -> str:
    """``uri`` with a relative SQLite path resolved against ``cwd`` (default: the working directory).

    Example:
        >>> absolute_uri("sqlite:///mlflow.db", Path("/runs"))
        'sqlite:////runs/mlflow.db'
    """
    uri = uri.strip()
    base = Path.cwd() if cwd is None else cwd
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path == ":memory:" or path.startswith("/"):
            return uri
        return "sqlite:///" + str((base / path).resolve())
    if uri.startswith(_REMOTE):
        return uri
    raise ConfigError(
        f"tracking.uri = {uri!r}: MLflow 3 does not accept file stores; "
        "use sqlite:///mlflow.db (a database file) or an http://host:port tracking server"
    )


_LOOPBACK_HOSTS = ("localhost", "ip6-localhost", "::1", "0.0.0.0")


def machine_local(uri: str) -> str | None:
    """Why ``uri`` reaches a tracking store on this machine only, or None if other machines may reach it.

    A SQLite file lives on one machine's disk, and a server on a loopback address
    (``127.0.0.0/8``, ``localhost``, ``::1``) is, from another machine, that
    machine's own loopback, where nothing listens.

    Example:
        >>> machine_local("http://127.0.0.1:5000")
        'its host 127.0.0.1 is the loopback address of each machine'
        >>> machine_local("http://10.0.0.10:5000") is None
        True
    """
    from urllib.parse import urlparse

    if uri.startswith("sqlite:"):
        return "it is a SQLite file on this machine's disk"
    host = (urlparse(uri).hostname or "").lower()
    if host in _LOOPBACK_HOSTS or host.startswith("127."):
        return f"its host {host} is the loopback address of each machine"
    return None
