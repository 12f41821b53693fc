"""Placement on a local multi-node cluster with fake GPUs: one actor per GPU
across nodes, and a run asking for more GPUs than exist fails fast."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from distmaml.assembly import runner_factory
from distmaml.config import load_config
from distmaml.engine.placement import EngineError
from distmaml.engine.ray_engine import RayEngine

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
    with pytest.raises(EngineError, match="needs 5 GPUs but the Ray cluster has 4"):
        RayEngine(config, runner_factory(config))
    assert time.time() - start < 10


def _flat(config):
    from distmaml.assembly import build_network, init_meta_params
    from distmaml.runner import ParamLayout

    params = init_meta_params(config, build_network(config))
    return ParamLayout(params).flatten(params)
