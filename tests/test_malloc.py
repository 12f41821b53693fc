"""A computing process keeps the memory it frees (distmaml.fastpath.malloc): no page faults per meta-step.

Each case runs in a fresh process, since ``mallopt`` changes a process for good
and glibc reads its tunables from the environment at start.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource

import pytest

from distmaml.machine.environ import environ

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _faults_per_step(steps: int, claim: bool = True) -> tuple[bool, list[int]]:
    """Builds the omniglot bench config's runner (conv4-64, 28x28, 5-way 1-shot, 15 queries) and counts
    the minor page faults of each of ``steps`` meta-steps of 2 tasks, after a warm-up step; ``claim``:
    the process is distmaml's own (its command, a worker), as opposed to a library caller's."""
    import torch

    from distmaml.bench import bench_config
    from distmaml.core.algorithm import init_algorithm_params
    from distmaml.fastpath import malloc
    from distmaml.run.assembly import build_runner

    torch.set_num_threads(1)
    if claim:
        malloc.claim()
    runner = build_runner(bench_config("omniglot", "batching=loop"))
    flat = runner.layout.flatten(init_algorithm_params(runner.model, runner.algorithm))
    runner.meta_grad(flat, 0, range(2))
    faults = []
    for step in range(1, steps + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        runner.meta_grad(flat, step, range(2))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return malloc.keep_freed_memory_if_claimed(), faults  # build_runner decided it; this only reads it


def _in_fresh_process(env: dict[str, str], claim: bool = True) -> tuple[bool, list[int]]:
    with environ(env), mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_faults_per_step, (3, claim))


def test_meta_steps_reuse_freed_memory_unless_the_environment_tunes_malloc() -> None:
    kept, faults = _in_fresh_process({})
    # glibc's own thresholds, as a user keeps them by setting one tunable (MALLOC_TRIM_THRESHOLD_'s default)
    own, faults_own = _in_fresh_process({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert kept and not own
    # 2 conv4 tasks free and allocate tens of MB a step: thousands of zeroed pages with glibc's defaults
    assert min(faults_own) > 2000, faults_own
    # kept: a step faults pages in only where its peak outgrows the heap (a few thousand at most, seldom)
    assert sum(faults) < sum(faults_own) / 10, (faults, faults_own)


def test_a_library_callers_process_keeps_glibcs_defaults() -> None:
    """A notebook that builds a runner (or calls distmaml.train(workers=0)) is not distmaml's process: its
    malloc settings stay glibc's, and its steps fault pages in as glibc's defaults make them."""
    kept, faults = _in_fresh_process({}, claim=False)
    assert not kept
    assert min(faults) > 2000, faults
