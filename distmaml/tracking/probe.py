"""A tracking server that does not answer fails the run in seconds, not minutes.

MLflow's HTTP client retries a server it cannot reach 7 times with a backoff
factor of 2 and a 120 s timeout per request: ``tracking.uri =
http://127.0.0.1:1`` hung a run for over 4 minutes before its first step.
``check_server`` runs before any engine, worker or trial starts: a TCP
connection to the server (3 s at most), then ``GET /health``, MLflow's
liveness endpoint (5 s at most). ``bound_http_retries`` then caps MLflow's
own retries for the rest of the run, so a server that dies mid-run stops it
within about half a minute per request instead of hanging it for minutes.
A SQLite URI needs neither: there is no server.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from distmaml.cluster.reach import unreachable
from distmaml.config import Config
from distmaml.errors import CANNOT_GO_ON, DistmamlError

CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection to the tracking server."""
HEALTH_TIMEOUT = 5.0
"""Seconds to wait for its answer to ``GET /health``."""

HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow's default: 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # 2: waits of 0 and 2 s between the attempts
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # 120 s per attempt
}
"""MLflow's HTTP client settings for a run (environment variables, MLflow 3); a value the user set wins."""


class TrackingError(DistmamlError, ConnectionError):
    """No MLflow server answers at ``tracking.uri``; the message says what to do."""

    exit_code = CANNOT_GO_ON


def check_tracking(config: Config) -> None:
    """``check_server(tracking.uri)`` when tracking is on; call it before anything starts."""
    if config.tracking.enabled:
        check_server(config.tracking.uri)


def bound_http_retries() -> None:
    """Caps MLflow's HTTP retries and timeouts for this process and the Ray processes it starts."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


def _uses_proxy(url: str) -> bool:
    parsed = urlparse(url)
    proxies = urllib.request.getproxies()
    return parsed.scheme in proxies and not urllib.request.proxy_bypass(parsed.hostname or "")


def check_server(uri: str) -> None:
    """Raises ``TrackingError`` unless an MLflow server answers at ``uri`` (http or https); else does nothing.

    Example:
        >>> check_server("sqlite:////runs/mlflow.db")   # no server: nothing to check
        >>> check_server("http://127.0.0.1:1")          # TrackingError within a few seconds
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    bound_http_retries()
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    start = time.monotonic()
    local = host in ("127.0.0.1", "localhost", "::1")
    fix = (
        f"start one with 'mlflow server --port {port}'"
        if local
        else f"check the address or start one there ('mlflow server --host {host} --port {port}'),"
    )
    where = f"tracking.uri = {uri!r}"
    # through a proxy only the HTTP request below can tell
    why = None if _uses_proxy(uri) else unreachable(host, port, CONNECT_TIMEOUT)
    if why is not None:
        raise TrackingError(f"{where}: no MLflow server answers ({why}); {fix} or --set tracking.enabled=false")
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # a server behind a login: MLflow's client brings the credentials
            return
        reason = f"HTTP {e.code} from {health}"
    except (urllib.error.URLError, OSError) as e:
        cause = getattr(e, "reason", e)
        reason = "timed out" if isinstance(cause, TimeoutError) else str(cause)
    raise TrackingError(
        f"{where}: the server does not answer as MLflow does ({reason} after {time.monotonic() - start:.1f} s); "
        f"{fix} or --set tracking.enabled=false"
    )
