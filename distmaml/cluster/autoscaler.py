"""What the cluster's autoscaler is doing for a run that waits: nodes starting, launches in flight, failures.

A run whose placement group waits for nodes (``placement._wait_until_placed``)
keeps waiting while the autoscaler makes progress and stops, with one line,
when it makes none. Ray 2.60 has no public call for this; what it reports,
read from the installed source:

- Autoscaler v1 (``ray up``, ``ray start --autoscaling-config``; the default):
  its monitor writes a JSON status to the GCS key-value store every update
  (``monitor.py``: ``ray_constants.DEBUG_AUTOSCALING_STATUS``, the key
  ``__autoscaling_status`` that ``ray status`` reads), with ``time`` and an
  ``autoscaler_report`` (``autoscaler.AutoscalerSummary``): ``pending_nodes``
  (``[ip, node type, status]`` of nodes launched and not yet up: booting,
  ``waiting-for-ssh``, ``syncing-files``, ``setting-up``), ``pending_launches``
  (node type: count of create calls in flight), ``failed_nodes`` and
  ``node_availability_summary`` (node types the provider said it could not
  launch, with the provider's reason, e.g. no capacity in the zone). A launch
  that raises anything else is only logged (``node_launcher.py``); the
  autoscaler then tries again on its next update.
- Autoscaler v2 (KubeRay with ``RAY_enable_autoscaler_v2``): the same, from
  ``ray.autoscaler.v2.sdk.get_cluster_status`` (``pending_nodes``,
  ``pending_launches``, ``failed_launches``).

Progress, for the run: a node is starting, or a node came up. Launches in
flight alone are not progress: a launch that fails every time is in flight
for a moment on every update.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

STATUS_KEY = "__autoscaling_status"
"""``ray_constants.DEBUG_AUTOSCALING_STATUS``: where autoscaler v1 writes its status."""


@dataclass(frozen=True)
class AutoscalerReport:
    """One look at the autoscaler."""

    starting: int
    """Nodes launched and not up yet (booting, setting up)."""
    launching: int
    """Launch requests in flight."""
    failures: tuple[str, ...]
    """What the autoscaler says failed lately: node types it could not launch (with the provider's reason),
    nodes that died while starting."""
    age: float
    """Seconds since the autoscaler wrote this report."""

    def describe(self) -> str:
        """A few words for the waiting line: ``1 node starting, 1 launch in flight``."""
        parts = []
        if self.starting:
            parts.append(f"{self.starting} node{'s' * (self.starting != 1)} starting")
        if self.launching:
            parts.append(f"{self.launching} launch{'es' * (self.launching != 1)} in flight")
        return ", ".join(parts) or "nothing launching"


def read_report(gcs_address: str | None = None) -> AutoscalerReport | None:
    """The autoscaler's latest report, or None when the cluster has no autoscaler reporting."""
    return _v1_report() or _v2_report(gcs_address)


def _v1_report() -> AutoscalerReport | None:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    try:
        raw = _internal_kv_get(STATUS_KEY)
        status = json.loads(raw) if raw else None
    except (ConnectionError, ValueError, RuntimeError):
        return None
    report = status.get("autoscaler_report") if isinstance(status, dict) else None
    if not isinstance(status, dict) or not isinstance(report, dict):
        return None
    failures = [f"a node of type {t} ({ip}) failed while starting" for ip, t in report.get("failed_nodes") or []]
    availability = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for node_type, record in availability.items():
        info = record.get("unavailable_node_information") if not record.get("is_available", True) else None
        if info:
            failures.append(f"{node_type} could not be launched: {info.get('category')}: {info.get('description')}")
    return AutoscalerReport(
        starting=len(report.get("pending_nodes") or []),
        launching=sum(int(n) for n in (report.get("pending_launches") or {}).values()),
        failures=tuple(failures),
        age=max(0.0, time.time() - float(status.get("time") or time.time())),
    )


def _v2_report(gcs_address: str | None) -> AutoscalerReport | None:
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if not is_autoscaler_v2(fetch_from_server=True):
            return None
        status = get_cluster_status(gcs_address or ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no v2 autoscaler, or an older protocol: nothing to read
        return None
    failures = [f"{r.ray_node_type_name} could not be launched: {r.details}" for r in status.failed_launches]
    failures += [f"a node of type {n.ray_node_type_name} failed: {n.failure_detail}" for n in status.failed_nodes]
    return AutoscalerReport(
        starting=len(status.pending_nodes),
        launching=sum(r.count for r in status.pending_launches),
        failures=tuple(failures),
        age=0.0,
    )
