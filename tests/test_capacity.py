"""What a cluster could ever hold, from nodes up and node types it can launch (pure arithmetic, no Ray)."""

from __future__ import annotations

import pytest

from distmaml.cluster.capacity import Bundle, NodeShape, describe, holders, nodes_needed, why_not

HEAD = NodeShape("node 10.0.0.1", {"CPU": 0.0})  # cluster/config.yaml: the head offers no CPUs
GPU_TYPE = NodeShape("node type gpu_worker", {"CPU": 2.0, "GPU": 1.0}, count=2, launchable=True)
CPU_TYPE = NodeShape("node type cpu_worker", {"CPU": 8.0}, count=3, launchable=True)
DRIVER = Bundle("driver", {"CPU": 1.0}, {"CPU": "engine.driver_cpus"})
KEYS = {"CPU": "engine.cpus_per_worker", "GPU": "engine.gpus_per_worker"}


def run(workers: int, cpus: float = 1.0, gpus: float = 0.0) -> list[Bundle]:
    res = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    return [DRIVER] + [Bundle("worker", res, KEYS) for _ in range(workers)]


def test_a_run_only_launchable_nodes_can_hold_is_feasible():
    assert why_not(run(2, gpus=1), "PACK", [HEAD, GPU_TYPE], max_launches=2) is None
    assert holders(run(2, gpus=1), "PACK", [HEAD, GPU_TYPE]) == "2 nodes of type gpu_worker {'CPU': 2, 'GPU': 1}"
    # judged from the head alone (what is up now) the same run has nowhere to go
    assert why_not(run(2, gpus=1), "PACK", [HEAD], max_launches=0) is not None


def test_a_bundle_larger_than_every_node_names_the_resource_and_the_largest_node():
    msg = why_not(run(2, cpus=64, gpus=1), "PACK", [HEAD, GPU_TYPE], max_launches=2)
    assert msg == (
        "the worker bundle {'CPU': 64, 'GPU': 1} fits no node the Ray cluster has or can launch: "
        "the largest, node type gpu_worker, offers CPU 2; lower engine.cpus_per_worker to 2"
    )
    no_gpu = why_not(run(1, gpus=4), "PACK", [NodeShape("node 127.0.0.1", {"CPU": 2.0})], max_launches=0)
    assert no_gpu == (
        "the worker bundle {'CPU': 1, 'GPU': 4} fits no node the Ray cluster has: no node offers GPU; "
        "lower engine.gpus_per_worker to 0"
    )


def test_the_driver_bundle_counts():
    # 2 workers x 1 CPU fit a 2-CPU head; with the driver's CPU they do not
    two_cpus = [NodeShape("node 127.0.0.1", {"CPU": 2.0})]
    assert why_not(run(2)[1:], "PACK", two_cpus, max_launches=0) is None
    assert why_not(run(2), "PACK", two_cpus, max_launches=0) == (
        "the run needs 3 CPUs (driver 1 + 2 workers x 1) but the Ray cluster has at most 2; "
        "lower workers or engine.cpus_per_worker or engine.driver_cpus, or add nodes"
    )


def test_launches_are_bounded_per_type_and_in_all():
    assert why_not(run(3, gpus=1), "PACK", [HEAD, GPU_TYPE], max_launches=2) == (
        "the run needs 3 GPUs (3 workers x 1) but the Ray cluster has or can launch at most 2; "
        "lower workers or engine.gpus_per_worker, or add nodes"
    )
    # 3 CPU nodes of 8 allowed by their type, but only 1 new node in all: 8 CPUs at most
    msg = why_not(run(9), "PACK", [HEAD, CPU_TYPE], max_launches=1)
    assert msg is not None and msg.startswith("the run needs 10 CPUs") and "at most 8;" in msg
    assert why_not(run(9), "PACK", [HEAD, CPU_TYPE], max_launches=2) is None


def test_strategies():
    bundles = run(2, gpus=1)
    msg = why_not(bundles, "STRICT_PACK", [HEAD, GPU_TYPE], max_launches=2)
    assert msg == (
        "engine.placement = STRICT_PACK puts all 3 bundles ({'CPU': 3, 'GPU': 2}) on one node, and no node "
        "the Ray cluster has or can launch is that large; use PACK or lower workers"
    )
    assert why_not(run(2), "STRICT_PACK", [HEAD, CPU_TYPE], max_launches=3) is None
    one_node = [NodeShape("node 127.0.0.1", {"CPU": 8.0})]
    assert why_not(run(2), "STRICT_SPREAD", one_node, max_launches=0) == (
        "engine.placement = STRICT_SPREAD puts each of the 3 bundles on a node of its own, but the Ray cluster "
        "has at most 1 that can hold one; use PACK or SPREAD, or lower workers"
    )
    assert why_not(run(2), "STRICT_SPREAD", [*one_node, CPU_TYPE], max_launches=3) is None
    assert why_not(run(2), "SPREAD", one_node, max_launches=0) is None  # SPREAD is best effort


@pytest.mark.parametrize(
    "strategy,node,expected",
    [
        ("PACK", {"CPU": 2.0, "GPU": 1.0}, 2),  # driver + worker, then worker
        ("SPREAD", {"CPU": 2.0, "GPU": 1.0}, 2),
        ("STRICT_SPREAD", {"CPU": 2.0, "GPU": 1.0}, 3),
        ("STRICT_PACK", {"CPU": 2.0, "GPU": 1.0}, None),
        ("STRICT_PACK", {"CPU": 4.0, "GPU": 2.0}, 1),
        ("PACK", {"CPU": 8.0}, None),  # no GPU: the workers fit nowhere
    ],
)
def test_nodes_needed(strategy, node, expected):
    assert nodes_needed(run(2, gpus=1), strategy, node) == expected


def test_describe_counts_equal_bundles():
    assert describe(run(3, gpus=1)) == "{'CPU': 1} + 3 x {'CPU': 1, 'GPU': 1}"
    assert holders(run(1), "PACK", [HEAD]) == ""  # no autoscaler: nothing to launch
