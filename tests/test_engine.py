"""The Ray engine against the in-process engine: same meta-gradients, same
parameters, also when a worker is killed mid-run."""

from __future__ import annotations

import os
import pickle
import signal
import time

import pytest
import ray
import torch

from distmaml.cluster.placement import cpu_threads
from distmaml.config import load_config
from distmaml.engine.protocol import GradShard, ParamLayout, to_wire
from distmaml.engine.ray_engine import RayEngine, WorkerFailure
from distmaml.run.assembly import assemble, runner_factory
from distmaml.run.trainer import Callback

BASE = [
    "precision=float64",
    "meta.batch_size=7",
    "meta.steps=5",
    "meta.val_every=0",
    "meta.val_tasks=5",
    "meta.test_tasks=9",
    "inner.steps=2",
    "tracking.enabled=false",
    "engine.cpus_per_worker=0.5",
    "engine.driver_cpus=0.5",
]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _config(workers, *extra):
    return load_config("sinusoid", [*BASE, f"workers={workers}", *extra])


def _train(run, callbacks=()):
    config, engine = run.config, run.engine
    trainer = run.trainer(progress=False, callbacks=list(callbacks))
    grads = []
    try:
        while trainer.step < config.meta.steps:
            trainer.train_step()
            grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.params.values()]))
            for cb in callbacks:
                cb.on_step(trainer.step, {})
        scores = trainer.meta_test()
    finally:
        engine.close()
    return trainer, grads, scores


@pytest.fixture(scope="module")
def in_process():
    return _train(assemble(_config(0)))


def assert_matches(in_process, trainer, grads, scores):
    """The in-process run's 5 steps' gradients, its parameters and its meta-test scores, to 1e-10."""
    ref_trainer, ref_grads, ref_scores = in_process
    assert len(grads) == len(ref_grads) == 5
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-10)
    for k, v in ref_trainer.params.items():
        torch.testing.assert_close(trainer.params[k], v, rtol=0, atol=1e-10)
    # meta-test sharded the same way: same per-task scores in task order
    torch.testing.assert_close(scores.after, ref_scores.after, rtol=0, atol=1e-10)
    torch.testing.assert_close(scores.before, ref_scores.before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_match_in_process(in_process, workers):
    run = assemble(_config(workers))
    trainer, grads, scores = _train(run)
    # each worker timed the candidates at start-up on its own device and kept its fastest
    reports = run.engine.batching()["workers"]
    assert len(reports) == workers
    for b in reports:
        assert set(b["seconds"]) == {"loop", "vmap", "batched"} and b["tasks"] == -(-7 // workers)
        assert b["choice"] == min(b["seconds"], key=b["seconds"].get)
        assert b["memory"]["shared_by"] == workers  # all on this one node: each plans with its part of its memory
    common = run.engine.batching()["choice"]  # every worker computes with the fastest summed over them
    assert common == min(reports[0]["seconds"], key=lambda n: sum(b["seconds"][n] for b in reports))
    assert_matches(in_process, trainer, grads, scores)


def test_parameters_too_big_to_go_inside_each_call_go_through_the_object_store(in_process, monkeypatch):
    """The sinusoid MLP's parameters go inside each call (``test_workers_match_in_process``); with
    ``INLINE_BYTES`` below their size they go through the object store, with the same result."""
    from distmaml.engine import ray_engine

    run = assemble(_config(2))
    flat = ParamLayout(run.params).flatten(run.params)
    assert not isinstance(ray_engine.params_arg(flat), ray.ObjectRef)  # 1,761 float64: 14 KB
    monkeypatch.setattr(ray_engine, "INLINE_BYTES", 0)
    assert isinstance(ray_engine.params_arg(flat), ray.ObjectRef)
    trainer, grads, scores = _train(run)
    assert_matches(in_process, trainer, grads, scores)


def test_a_shard_travels_as_itself_with_its_gradient_as_one_raw_buffer():
    shard = GradShard(torch.arange(6.0, dtype=torch.float64), 1.5, 0.25, 3, 0.125)
    buffers: list[pickle.PickleBuffer] = []
    wire = pickle.dumps(shard, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and buffers[0].raw().nbytes == 6 * 8  # out of band: not pickled element by element
    got = pickle.loads(wire, buffers=buffers)
    assert type(got) is GradShard and got[1:] == shard[1:]
    assert torch.equal(got.grad, shard.grad)


def test_a_worker_returns_the_shard_type_the_driver_sums(in_process):
    """A worker's answer arrives as a ``GradShard`` (no wire type of its own); the two shards' sum over the
    meta-batch is the first step's gradient of the in-process run."""
    ref_grads = in_process[1]
    run = assemble(_config(2))
    try:
        ref = ray.put(to_wire(ParamLayout(run.params).flatten(run.params)))
        halves = (range(0, 4), range(4, 7))
        shards = ray.get([a.meta_grad.remote(ref, 0, r.start, r.stop) for a, r in zip(run.engine.actors, halves)])
    finally:
        run.engine.close()
    assert [type(s) for s in shards] == [GradShard, GradShard] and [s.tasks for s in shards] == [4, 3]
    assert all(s.seconds > 0 for s in shards)
    torch.testing.assert_close((shards[0].grad + shards[1].grad) / 7, ref_grads[0], rtol=0, atol=1e-10)


class KillWorker(Callback):
    """SIGKILLs a worker's process by its pid after a given step."""

    def __init__(self, engine: RayEngine, after_step: int, worker: int = 1) -> None:
        self.engine, self.after_step, self.worker = engine, after_step, worker
        self.killed: list[int] = []

    def on_step(self, step, metrics):
        if step in (self.after_step if isinstance(self.after_step, tuple) else (self.after_step,)):
            pid = self.engine.describe()[self.worker]["pid"]
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)


def test_killed_worker_changes_nothing(in_process, tmp_path):
    """A worker SIGKILLed mid-run is replaced, its shard re-run: same parameters, one replacement reported."""
    ref_trainer, _, _ = in_process
    run = assemble(_config(2))
    engine = run.engine
    killer = KillWorker(engine, after_step=2)
    trainer = run.trainer(tmp_path, progress=False, callbacks=[killer])
    try:
        result = trainer.fit()
    finally:
        engine.close()
    assert len(killer.killed) == 1
    assert result["workers"] == 2 and result["worker_replacements"] == 1
    assert engine.events[0]["worker"] == 1 and engine.events[0]["during"] == "meta-step 2"
    for k, v in ref_trainer.params.items():
        torch.testing.assert_close(trainer.params[k], v, rtol=0, atol=1e-10)


def test_too_many_failures_stop_the_run():
    run = assemble(_config(2, "engine.max_worker_failures=1"))
    killer = KillWorker(run.engine, after_step=(1, 2))
    with pytest.raises(WorkerFailure, match="exceed engine.max_worker_failures = 1"):
        _train(run, [killer])


def test_more_cpus_than_the_cluster_fails_fast():
    config = _config(3, "engine.cpus_per_worker=2")
    start = time.time()
    with pytest.raises(
        Exception, match=r"needs 6.5 CPUs \(driver 0.5 \+ 3 workers x 2\) but the Ray cluster has at most 4;"
    ):
        RayEngine(config, runner_factory(config))
    assert time.time() - start < 10


def test_the_driver_computes_on_its_own_bundles_cpus_while_the_workers_do():
    """The driver's sum and outer step run on ``engine.driver_cpus`` torch threads (at least 1), as each
    worker's compute on ``engine.cpus_per_worker``: torch's default of one thread per core made every small
    op of the driver wake an OpenMP thread that spun on the workers' cores. The caller's setting is back
    after ``close``, also when the engine fails to start."""
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        run = assemble(_config(1, "engine.driver_cpus=2"))
        try:
            assert torch.get_num_threads() == 2
            run.trainer(progress=False).train_step()
            assert torch.get_num_threads() == 2
        finally:
            run.close()
        assert torch.get_num_threads() == 3
        # less than one CPU (BASE: 0.5): one thread
        assert cpu_threads(_config(1).engine.driver_cpus) == 1
        with pytest.raises(Exception, match="but the Ray cluster has at most 4"):
            assemble(_config(1, "engine.driver_cpus=4"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)
