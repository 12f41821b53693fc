"""Tasks are a pure function of (seed, split, step, task id)."""

from __future__ import annotations

import torch

from distmaml.tasks import SinusoidTasks, task_generator
from distmaml.tasks.sinusoid import AMPLITUDE, PHASE, X_RANGE


def test_same_tasks_whatever_the_split_of_the_batch():
    fam = SinusoidTasks(shots=10, queries=10, seed=3)
    whole = fam.sample("train", 12, range(25))
    for cuts in ([0, 25], [0, 13, 25], [0, 9, 17, 25], [0, 1, 2, 24, 25]):
        parts = [fam.sample("train", 12, range(a, b)) for a, b in zip(cuts, cuts[1:])]
        for i, field in enumerate(whole):
            assert torch.equal(torch.cat([p[i] for p in parts]), field)
    # out of order: each id is its own stream
    rev = fam.sample("train", 12, [24, 3])
    assert torch.equal(rev.support_x[0], whole.support_x[24])
    assert torch.equal(rev.query_y[1], whole.query_y[3])


def test_steps_splits_and_seeds_differ():
    fam = SinusoidTasks(shots=5, queries=5, seed=0)
    a = fam.sample("train", 0, range(4)).support_x
    assert not torch.equal(a, fam.sample("train", 1, range(4)).support_x)
    assert not torch.equal(a, fam.sample("test", 0, range(4)).support_x)
    assert not torch.equal(a, SinusoidTasks(shots=5, queries=5, seed=1).sample("train", 0, range(4)).support_x)


def test_shapes_and_ranges():
    fam = SinusoidTasks(shots=10, queries=7, seed=0)
    b = fam.sample("train", 0, range(300))
    assert b.support_x.shape == (300, 10, 1) and b.query_x.shape == (300, 7, 1)
    assert b.support_x.min() >= X_RANGE[0] and b.support_x.max() <= X_RANGE[1]
    amps, phases = zip(*[fam.sample_one("train", 0, i)[:2] for i in range(300)])
    amps, phases = torch.stack(amps), torch.stack(phases)
    assert AMPLITUDE[0] <= amps.min() and amps.max() <= AMPLITUDE[1]
    assert PHASE[0] <= phases.min() and phases.max() <= PHASE[1]
    # y = A sin(x - phase) holds for each task
    for i in (0, 17):
        amp, phase, sx, sy, _, _ = fam.sample_one("train", 0, i)
        torch.testing.assert_close(sy, amp * torch.sin(sx - phase))


def _one_task(fam: SinusoidTasks, split: str, step: int, task_id: int) -> tuple[torch.Tensor, ...]:
    """The reference: one task alone from its own generator, its draws in two calls (amplitude and
    phase, then the inputs), as the sampler computed each task before it worked over the batch."""
    g = task_generator(fam.seed, split, step, task_id)
    u = torch.rand(2, generator=g, dtype=torch.float64)
    amp = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u[0]
    phase = PHASE[0] + (PHASE[1] - PHASE[0]) * u[1]
    x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(
        fam.shots + fam.queries, 1, generator=g, dtype=torch.float64
    )
    y = amp * torch.sin(x - phase)
    k = fam.shots
    return amp, phase, x[:k], y[:k], x[k:], y[k:]


def test_batch_sampling_equals_each_task_computed_alone():
    """The sampler draws per task and computes over the batch: the same tasks, bit for bit, as each
    task computed alone (so runs before and after that change sample the same tasks)."""
    for shots, queries, ids in ((10, 10, range(200)), (1, 1, [7, 0, 3]), (5, 300, [4, 999])):
        fam = SinusoidTasks(shots=shots, queries=queries, seed=11)
        for split in ("train", "val", "test"):
            batch = fam.sample(split, 5, ids)
            alone = [_one_task(fam, split, 5, i) for i in ids]
            for field, column in zip(batch, zip(*(a[2:] for a in alone))):
                assert field.is_contiguous() and field.dtype == torch.float64
                assert torch.equal(field, torch.stack(column))
            for i, reference in zip(ids, alone):
                assert all(torch.equal(a, b) for a, b in zip(fam.sample_one(split, 5, i), reference))
