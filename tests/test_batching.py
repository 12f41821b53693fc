"""``batching: auto``: candidates timed on the device at hand, the fastest kept and recorded."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_core import _conv, _image_batch

from distmaml.config import load_config
from distmaml.core import InnerLoop, meta_grad
from distmaml.core.batching import BATCHINGS, candidates, choose_batching, describe_batching, time_candidates
from distmaml.models import sinusoid_mlp
from distmaml.run.assembly import assemble, build_runner
from distmaml.run.runner import AUTO_TASKS

CONV_INNER = InnerLoop(lr=0.1, steps=1)


def test_candidates_and_the_unmeasured_rule():
    assert candidates(sinusoid_mlp()) == ("loop", "vmap", "batched") and candidates(_conv()) == BATCHINGS
    assert (
        choose_batching(sinusoid_mlp(), "cpu") == "batched" and choose_batching(_conv(), "cpu") == "loop_channels_last"
    )


def test_a_forced_slow_candidate_loses_in_real_time():
    """Real meta-steps on this CPU: the same loop, once and four times over; the single one wins."""
    model, batch = _conv(), _image_batch(tasks=2)
    params = dict(model.named_parameters())
    calls: list[str] = []

    def run(name: str) -> None:
        calls.append(name)
        for _ in range(4 if name == "slow" else 1):
            meta_grad(model, params, batch, CONV_INNER, batching="loop")

    got = time_candidates(run, ["slow", "loop"], steps=3, tasks=2)
    assert got.choice == "loop" and got.tasks == 2
    assert set(got.seconds) == {"slow", "loop"} and got.seconds["slow"] > got.seconds["loop"] > 0
    # one untimed round, then turns: slow, loop, slow, loop... (until slow is out at > 3x the best)
    assert calls[:4] == ["slow", "loop", "slow", "loop"]
    assert "batching loop (seconds per meta-step of 2 tasks: slow " in describe_batching(got.as_dict())


def test_timing_rounds_are_interleaved_and_out_of_memory_disqualifies():
    """An injected clock: each run advances it by the candidate's cost; 'big' runs out of memory."""
    now = itertools.count()
    cost = {"a": 5, "b": 2, "c": 3}
    clock_value = [0.0]

    def clock() -> float:
        return clock_value[0]

    def run(name: str) -> None:
        next(now)
        if name == "big":
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        clock_value[0] += cost[name]

    got = time_candidates(run, ["a", "b", "big", "c"], steps=2, clock=clock)
    assert got.choice == "b"
    assert got.seconds == {"a": 5.0, "b": 2.0, "c": 3.0}
    assert got.skipped == {"big": "ran out of memory while timed"}
    with pytest.raises(torch.OutOfMemoryError, match="every batching ran out of memory"):
        time_candidates(run, ["big"], clock=clock)
    # fast meta-steps: rounds go on until each candidate has run min_seconds in all (b: 5 x 2)
    before = next(now)
    got = time_candidates(run, ["a", "b", "c"], steps=1, min_seconds=10, clock=clock)
    assert got.choice == "b" and next(now) - before - 1 == 3 * (1 + 5)


def test_task_runner_times_every_candidate_keeps_the_fastest_and_uses_it():
    config = load_config("sinusoid", ["precision=float64", "meta.batch_size=12", "tracking.enabled=false"])
    runner = build_runner(config, device="cpu")
    assert runner.batching_report() == {"choice": "auto", "seconds": {}, "tasks": 0}
    flat = runner.layout.flatten(dict(runner.model.named_parameters()))
    shard = runner.meta_grad(flat, 0, range(12))
    chosen = runner.measured
    assert chosen is not None and chosen.tasks == min(12, AUTO_TASKS)
    assert set(chosen.seconds) == set(candidates(runner.model))
    assert chosen.choice == min(chosen.seconds, key=lambda k: chosen.seconds[k])
    assert runner.batching_report() == chosen.as_dict()
    runner.meta_grad(flat, 1, range(12))
    assert runner.measured is chosen  # timed once, at the first meta-step
    for name in candidates(runner.model):  # whichever won, the gradient is the same
        runner.batching = name
        torch.testing.assert_close(runner.meta_grad(flat, 0, range(12)).grad, shard.grad, rtol=1e-10, atol=1e-12)


def test_an_evaluation_goes_in_chunks_that_fit_and_the_chunks_change_nothing():
    """A meta-test scores hundreds of tasks: with ``auto`` on a candidate that holds every task at once, the
    runner samples and scores as many as its start-up measurement says fit (not EVAL_CHUNK blindly)."""
    from distmaml.core.batching import BatchingChoice, expected_bytes
    from distmaml.run.runner import EVAL_CHUNK

    config = load_config("sinusoid", ["precision=float64", "meta.batch_size=4", "tracking.enabled=false"])
    runner = build_runner(config, device="cpu")
    flat = runner.layout.flatten(dict(runner.model.named_parameters()))
    whole = runner.evaluate(flat, "test", range(11), 3)  # not measured yet: EVAL_CHUNK at once
    assert runner.eval_chunk() == EVAL_CHUNK and whole.after.shape == (11,)
    one = 1 << 20
    for choice, chunk in [("batched", 3), ("vmap", 3), ("loop", EVAL_CHUNK)]:
        budget = expected_bytes(choice, one, 3) + one // 2  # room for 3 tasks at once, not 4
        runner.measured = BatchingChoice(choice, {}, 4, memory={"one_task": one, "budget": budget, "shard": 4})
        assert runner.eval_chunk() == chunk, choice
        got = runner.evaluate(flat, "test", range(11), 3)
        torch.testing.assert_close(got.after, whole.after, rtol=1e-12, atol=1e-12, msg=choice)
        torch.testing.assert_close(got.before, whole.before, rtol=1e-12, atol=1e-12, msg=choice)
    assert runner.evaluate(flat, "test", range(0), 3).after.shape == (0,)


def test_result_json_records_the_choice(tmp_path):
    config = load_config(
        "sinusoid", ["workers=0", "meta.steps=2", "meta.test_tasks=4", "meta.val_every=0", "tracking.enabled=false"]
    )
    result = assemble(config).fit(tmp_path, progress=False)
    b = result["batching"]
    assert set(b) == {"choice", "seconds", "tasks", "skipped", "memory"}
    assert set(b["seconds"]) == {"loop", "vmap", "batched"}
    assert b["skipped"] == {} and b["memory"]["shard"] >= b["tasks"]  # what auto fitted by, in result.json
    assert b["choice"] == min(b["seconds"], key=b["seconds"].get)
    fixed = load_config(
        "sinusoid", ["workers=0", "meta.steps=1", "meta.test_tasks=2", "tracking.enabled=false", "batching=loop"]
    )
    assert assemble(fixed).fit(progress=False)["batching"]["choice"] == "loop"


@pytest.mark.parametrize("name", ["maml", "anil", "mamlpp"])
def test_every_candidate_scores_the_same(name):
    """Evaluation (first-order adaptation, per-task scores) through each batching agrees too."""
    from test_algorithms import _algo, _meta

    from distmaml.core.evaluate import score_tasks

    model, batch = _conv(), _image_batch(tasks=4)
    algo = _algo(name, model, steps=2)
    meta = _meta(model, algo)
    ref = score_tasks(model, meta, batch, algo, 2, batching="loop")
    for b in candidates(model):
        got = score_tasks(model, meta, batch, algo, 2, batching=b, chunk=3)
        torch.testing.assert_close(got.after, ref.after, rtol=0, atol=1e-12, msg=b)
        torch.testing.assert_close(got.before, ref.before, rtol=0, atol=1e-12, msg=b)
