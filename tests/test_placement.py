"""Placement on a local multi-node cluster with fake GPUs and no autoscaler: one
actor per GPU across nodes, and a run no node could hold (the driver's bundle
included) fails fast. The same on an autoscaling cluster: tests/test_autoscale.py."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from distmaml.cluster.placement import EngineError
from distmaml.config import load_config
from distmaml.engine.ray_engine import RayEngine
from distmaml.run.assembly import runner_factory

BASE = ["meta.batch_size=8", "tracking.enabled=false", "engine.cpus_per_worker=0.5", "engine.driver_cpus=0.5"]


@pytest.fixture(scope="module")
def gpu_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)  # fake GPUs: resources only
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_one_actor_per_gpu_across_nodes(gpu_cluster):
    config = load_config("sinusoid", [*BASE, "workers=4", "engine.placement=SPREAD"])
    engine = RayEngine(config, runner_factory(config))
    try:
        assert engine.resources.gpus == 1.0  # auto: the cluster has GPUs
        where = engine.describe()
        slots = {(w["node_id"], tuple(w["gpu_ids"])) for w in where}
        assert all(len(w["gpu_ids"]) == 1 for w in where)
        assert len(slots) == 4  # no GPU shared
        assert len({w["node_id"] for w in where}) == 2  # both GPU nodes used
        assert all(w["cuda_visible_devices"] == w["gpu_ids"][0] for w in where)  # each sees exactly its GPU
        shard = engine.meta_batch(_flat(config), 0, 8)  # and they compute (on the CPU: the GPUs are fake)
        assert shard.tasks == 8
    finally:
        engine.close()


def test_cpu_device_takes_no_gpus(gpu_cluster):
    config = load_config("sinusoid", [*BASE, "workers=2", "device=cpu"])
    engine = RayEngine(config, runner_factory(config))
    try:
        assert engine.resources.gpus == 0.0
        assert all(w["gpu_ids"] == [] for w in engine.describe())
    finally:
        engine.close()


def test_more_gpus_than_exist_fails_fast(gpu_cluster):
    config = load_config("sinusoid", [*BASE, "workers=5"])
    start = time.time()
    with pytest.raises(EngineError, match=r"the run needs 5 GPUs \(5 workers x 1\) but the Ray cluster has at most 4;"):
        RayEngine(config, runner_factory(config))
    assert time.time() - start < 10


def test_the_driver_bundle_counts(gpu_cluster):
    # 4 workers x 1 CPU fit the 5 CPUs of the cluster; with the driver's 2 they never can
    config = load_config(
        "sinusoid", [*BASE, "workers=4", "device=cpu", "engine.cpus_per_worker=1", "engine.driver_cpus=2"]
    )
    start = time.time()
    with pytest.raises(EngineError) as e:
        RayEngine(config, runner_factory(config))
    assert time.time() - start < 10
    assert str(e.value) == (
        "the run needs 6 CPUs (driver 2 + 4 workers x 1) but the Ray cluster has at most 5; "
        "lower workers or engine.cpus_per_worker or engine.driver_cpus, or add nodes"
    )


def test_node_types_reported_to_the_gcs_count(gpu_cluster):
    # an autoscaler that reports its cluster config to the GCS (KubeRay's) makes its node types launchable
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    from distmaml.cluster.placement import cluster_shape, launchable_node_types

    reported = autoscaler_pb2.ClusterConfig()
    group = reported.node_group_configs.add(name="big_gpu", max_count=3)
    group.resources.update({"CPU": 8, "GPU": 4})
    reported.node_group_configs.add(name="off", max_count=0).resources.update({"CPU": 64})
    namespace, key = (
        ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
        ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
    )
    gcs = ray._private.worker.global_worker.gcs_client
    gcs.internal_kv_put(key, reported.SerializeToString(), True, namespace)
    try:
        assert state.get_cluster_config() is not None
        types, launches = launchable_node_types()
        assert [(t.name, t.resources, t.count) for t in types] == [("node type big_gpu", {"CPU": 8.0, "GPU": 4.0}, 3)]
        assert launches == 3
        config = load_config("sinusoid", [*BASE, "meta.batch_size=12", "workers=12", "engine.gpus_per_worker=1"])
        from distmaml.cluster.placement import check_feasible, worker_resources

        check_feasible(config, worker_resources(config))  # 4 GPUs up + 3 x 4 to launch: 16 >= 12
        assert len(cluster_shape().nodes) == 4  # 3 nodes up and the one type
    finally:
        gcs.internal_kv_del(key, False, namespace)
    assert launchable_node_types() == ([], 0)


def _flat(config):
    from distmaml.engine.protocol import ParamLayout
    from distmaml.run.assembly import build_network, init_meta_params

    params = init_meta_params(config, build_network(config))
    return ParamLayout(params).flatten(params)


def test_a_run_that_fits_waits_for_busy_nodes_then_times_out(gpu_cluster, capsys):
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="SPREAD")  # other work: 4 of the 5 CPUs
    ray.get(held.ready(), timeout=60)
    try:
        config = load_config("sinusoid", [*BASE, "workers=2", "device=cpu", "engine.startup_timeout=4"])
        start = time.time()
        with pytest.raises(EngineError) as e:
            RayEngine(config, runner_factory(config))  # 1.5 CPUs: the cluster could hold it, once the other work ends
        assert 4 <= time.time() - start < 30
    finally:
        remove_placement_group(held)
    assert str(e.value) == (
        "the run's placement group 3 x {'CPU': 0.5} (PACK) was not placed within "
        "engine.startup_timeout = 4s; the cluster has {'CPU': 1, 'GPU': 4} available: lower workers or the "
        "resources per worker"
    )
    waits = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distmaml: waiting")]
    assert len(waits) == 1 and waits[0].endswith(
        "s for the run's placement group 3 x {'CPU': 0.5} (PACK): no node type to launch: "
        "waiting for busy nodes (engine.startup_timeout = 4 s)"
    )
