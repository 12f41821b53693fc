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
