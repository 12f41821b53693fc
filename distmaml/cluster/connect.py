"""Joining a Ray cluster, or starting a private one, and failing fast when none answers.

``ray.init(address="10.0.0.9:6379")`` with nobody listening retries for about a
minute before it gives up, and a stale ``ray start`` address file does the
same. ``connect`` first opens a plain TCP connection to the cluster's GCS (or
Ray Client server) with a short timeout, so a wrong ``--address`` fails in a
few seconds with one line that names the address and what to do.

Addresses, as ``distmaml train --address`` takes them:

- ``local``: a private Ray instance in this process tree (tests, one machine);
  never joins a cluster that happens to run on the machine.
- ``auto``: ``RAY_ADDRESS`` if set, else the cluster that ``ray start`` last
  started on this node (what a script run by ``ray submit`` on the head uses).
- ``host:port``: a cluster's GCS; ``ray://host:port``: a Ray Client server.

Token authentication (Ray 2.60): a cluster started with ``RAY_AUTH_MODE=token``
or with a token in ``~/.ray/auth_token`` refuses clients that send none. Ray's
own client turns token mode on by itself only for ``auto``; for an explicit
address it sends nothing unless ``RAY_AUTH_MODE=token`` is set, and fails after
about 25 s. ``connect`` therefore turns token mode on for any address when
``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``): measured here, a client in
token mode still joins a cluster without authentication, so this costs nothing.
A refused token is reported with what to set.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import urlparse

from distmaml.cluster.reach import unreachable
from distmaml.errors import CANNOT_GO_ON, DistmamlError

PROBE_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection to the cluster before giving up."""


class ClusterError(DistmamlError, ConnectionError):
    """No Ray cluster could be reached at the address given; the message says what to do."""

    exit_code = CANNOT_GO_ON


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a job's entrypoint: the job's runtime environment, as JSON."""


def job_runtime_env() -> dict[str, Any] | None:
    """The runtime environment of the Ray job this process is the entrypoint of, or None outside a Ray job."""
    text = os.environ.get(JOB_CONFIG_ENV)
    if not text:
        return None
    try:
        env = json.loads(text).get("runtime_env")
    except (ValueError, AttributeError):
        return None
    return env if isinstance(env, dict) else {}


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``ray://host:port`` (the Ray Client port defaults to 10001)."""
    text = address if "://" in address else f"gcs://{address}"
    parsed = urlparse(text)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or (port is None and not address.startswith("ray://")):
        raise ClusterError(f"--address {address!r}: expected local, auto, host:port or ray://host:port")
    return parsed.hostname, port if port is not None else 10001


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raises ``ClusterError`` unless a TCP connection to ``address`` opens within ``timeout`` seconds."""
    host, port = split_address(address)
    why = unreachable(host, port, timeout)
    if why is not None:
        raise ClusterError(
            f"--address {address}: no Ray cluster answers at {host}:{port} ({why}); start one with "
            f"'ray up cluster/config.yaml' or 'ray start --head --port {port}', or pass --address local "
            "to run on this machine alone"
        )


def resolve(address: str | None) -> str:
    """The address ``ray.init`` will use: ``local``, ``host:port`` or ``ray://host:port``.

    ``None`` means ``RAY_ADDRESS`` if set, else ``local``.
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return env
        from ray._private import services  # no public API finds the address 'ray start' recorded

        try:
            found = services.canonicalize_bootstrap_address("auto")
        except ConnectionError as e:
            raise ClusterError(
                "--address auto: no running Ray cluster found on this machine; start one with "
                "'ray start --head' (or 'ray up cluster/config.yaml' and run through 'ray submit'), "
                "set RAY_ADDRESS, or pass --address local"
            ) from e
        if not found:
            raise ClusterError("--address auto: no running Ray cluster found on this machine; pass --address local")
        return found
    return address


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def enable_token_auth_if_available() -> bool:
    """Sets ``RAY_AUTH_MODE=token`` (for this process and its children) if unset and a token exists.

    Must run before ``ray.init``; Ray's cached config is refreshed as Ray's own
    ``address="auto"`` path does it.
    """
    if "RAY_AUTH_MODE" in os.environ or not _token_available():
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:  # Ray caches its config from the environment when it loads: refresh it
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")
    return True


def connect(address: str | None = None, *, num_cpus: int | None = None, **init_kwargs: Any) -> str:
    """Starts or joins Ray as ``address`` asks; returns the address joined (``local`` for a private one).

    Does nothing if Ray is already initialised in this process (a Tune trial,
    a test fixture). ``num_cpus`` only applies to ``local``.

    Example:
        >>> connect("local", num_cpus=2)
        'local'
        >>> connect("10.0.0.9:6379")  # nobody there: ClusterError within PROBE_TIMEOUT seconds
    """
    import ray

    from distmaml.machine import interrupt

    if ray.is_initialized():
        return address or "local"
    target = resolve(address)
    if target == "local":
        with interrupt.around_ray_init():  # ray.init replaces the SIGTERM handler of a run that stops cleanly
            ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
        return "local"
    probe(target)
    enable_token_auth_if_available()
    try:
        with interrupt.around_ray_init():
            ray.init(address=target, **init_kwargs)
    except ConnectionError as e:
        text = str(e) + str(e.__cause__ or "")
        if "auth" in text.lower() or "token" in text.lower():
            raise ClusterError(
                f"--address {target}: the cluster refused this client's authentication token; set "
                "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                "(on the head: 'ray get-auth-token')"
            ) from e
        raise ClusterError(f"--address {target}: could not join the Ray cluster there ({e})") from e
    return target
