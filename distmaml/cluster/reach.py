"""Whether anything listens at host:port, asked with a short timeout.

Ray's and MLflow's clients retry an address where nobody listens for a
minute or more; a plain TCP connection tells in at most ``timeout`` seconds.
``distmaml.cluster.connect`` (``--address``) and ``distmaml.tracking.probe``
(``tracking.uri``) turn the answer into their one-line errors.
"""

from __future__ import annotations

import socket
import time


def unreachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to ``host:port`` opens within ``timeout`` s, else why not and after how long.

    Example:
        >>> unreachable("127.0.0.1", 1, 3.0)
        'Connection refused after 0.0 s'
    """
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        return f"{reason} after {time.monotonic() - start:.1f} s"
