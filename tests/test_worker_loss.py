"""A worker lost at any moment is replaced, and the run ends as an undisturbed one would.

Real Ray workers are SIGKILLed by pid at a named point of their life
(``distmaml.engine.testpoints``): while they start (``startup``), while they
time ``batching: auto`` (``batching``), inside meta-step 3, inside validation
and inside the meta-test. The plan and the handshake are files in one folder
that every worker of this module's Ray instance knows from its environment
(``tests/pausing.py``). Every disturbed run ends with the parameters of the
undisturbed in-process run (float64, 1e-10), with ``result.json`` counting the
replacement; a worker that crashes every time it starts stops the run after
``engine.max_worker_failures`` tries with one line, exit 3.

The driver's engine (Ray actors) runs here by default; the collective engine
(a Ray Train group restarted from its checkpoint) is marked slow.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import ray
import torch
from pausing import acted_at, clear, disturb, kill, plan, points_env

from distmaml.cli import main
from distmaml.config import load_config
from distmaml.run.assembly import assemble
from distmaml.run.checkpoint import load_checkpoint

BASE = [
    "precision=float64",
    "meta.batch_size=6",
    "meta.steps=6",
    "meta.val_every=3",
    "meta.checkpoint_every=2",
    "meta.val_tasks=4",
    "meta.test_tasks=6",
    "inner.steps=2",
    "model.hidden=[8,8]",
    "tracking.enabled=false",
    "engine.cpus_per_worker=0.5",
    "engine.driver_cpus=0.5",
    "batching=batched",  # auto times the candidates in every worker (seconds each); the batching case keeps it
]


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    """The plan-and-handshake folder every worker of the module's Ray instance reads (its environment)."""
    return tmp_path_factory.mktemp("points")


@pytest.fixture(scope="module", autouse=True)
def ray_instance(points):
    """Ray's processes, Ray Train's workers among them, inherit the test points' folder from here."""
    previous = os.environ.copy()
    os.environ.update(points_env(points))
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(previous)


@pytest.fixture
def folder(points):
    clear(points)
    yield points
    clear(points)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """The in-process run's final parameters (the engines match it to 1e-10: tests/test_engine.py)."""
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    result = assemble(load_config("sinusoid", [*BASE, "workers=0"])).fit(run_dir, progress=False)
    assert result["steps"] == 6
    return load_checkpoint(run_dir).params


def assert_same_params(run_dir, reference):
    got = load_checkpoint(run_dir)
    assert got.step == 6
    for k, v in reference.items():
        assert got.params[k].dtype == torch.float64
        torch.testing.assert_close(got.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")


def killed_run(folder, tmp_path, point, *extra):
    """A 2-worker run whose first worker to reach ``point`` is SIGKILLed there; its result."""
    plan(folder, point)
    thread = disturb(folder, kill)
    run = assemble(load_config("sinusoid", [*BASE, "workers=2", *extra]))
    result = run.fit(tmp_path / "run", progress=False)
    thread.join(10)
    assert len(acted_at(folder)) == 1, f"no worker reached {point}"
    return run, result


@pytest.mark.parametrize(
    ("point", "during"),
    [
        ("startup", "start-up"),  # the one of issue 24; the others take as long (half a minute or more): slow
        pytest.param("batching", "start-up", marks=pytest.mark.slow),  # with batching=auto
        pytest.param("step:3", "meta-step 3", marks=pytest.mark.slow),
        pytest.param("validation", "val evaluation", marks=pytest.mark.slow),
        pytest.param("meta_test", "test evaluation", marks=pytest.mark.slow),
    ],
)
def test_driver_engine_replaces_a_worker_lost_at_any_moment(point, during, folder, undisturbed, tmp_path):
    run, result = killed_run(folder, tmp_path, point, *(["batching=auto"] if point == "batching" else []))
    assert result["worker_replacements"] == 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["worker_replacements"] == 1
    (event,) = run.engine.events
    assert event["during"] == during and event["why"] == "The actor is dead because its worker process has died"
    assert_same_params(tmp_path / "run", undisturbed)
    print(f"\n{point}: replaced, first answer {event['seconds']:.1f} s after the loss was noticed")


def test_a_worker_that_always_crashes_while_starting_stops_the_run_with_one_line(folder, tmp_path, capsys):
    plan(folder, "startup", "crash", 100)
    sets = [x for o in [*BASE, "engine.max_worker_failures=2"] for x in ("--set", o)]
    code = main(["train", "--workers", "2", "--quiet", "--out", str(tmp_path / "run"), *sets])
    err = capsys.readouterr().err
    assert code == 3, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("distmaml: error: worker "), err
    assert lines[-1].endswith(
        "died during start-up (The actor is dead because its worker process has died): 3 worker failures "
        "exceed engine.max_worker_failures = 2 (during start-up x3); the run stops"
    ), err
    assert "Traceback" not in err


COLLECTIVE_POINTS = [
    "startup",  # before the first checkpoint (the batching timing too): the group starts again from scratch
    "step:3",  # the group restarts from the checkpoint of step 2
    "meta_test",  # from the last step's checkpoint, straight into the meta-test
]


@pytest.mark.slow  # a Ray Train group, stopped and started again: one to three minutes each on a busy machine
@pytest.mark.parametrize("point", COLLECTIVE_POINTS)
def test_collective_group_restarts_after_a_worker_lost_at_any_moment(point, folder, undisturbed, tmp_path):
    run, result = killed_run(folder, tmp_path, point, "engine.reduce=collective")
    assert result["workers"] == 2 and result["worker_replacements"] == 1
    assert run.engine.replacements == 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["worker_replacements"] == 1
    assert_same_params(tmp_path / "run", undisturbed)
    print(f"\n{point}: the run ended {time.time() - acted_at(folder)[0]:.1f} s after the kill")


@pytest.mark.slow
def test_a_collective_worker_that_always_crashes_while_starting_stops_the_run_with_one_line(folder, tmp_path, capsys):
    plan(folder, "startup", "crash", 100)
    sets = [x for o in [*BASE, "engine.reduce=collective", "engine.max_worker_failures=1"] for x in ("--set", o)]
    run_dir = tmp_path / "run"
    code = main(["train", "--workers", "2", "--quiet", "--out", str(run_dir), *sets])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    line = [x for x in err.splitlines() if x.strip()][-1]
    # the last loss is a rank's, or one Ray Train met while it launched the group (the driver relaunches it)
    assert line.startswith(
        (
            "distmaml: error: the worker group failed 2 times (last: rank ",
            "distmaml: error: the worker group failed 2 times (last: a worker, while the group launched: ",
        )
    ), line
    assert line.endswith(
        "; losses during start-up x2), more than engine.max_worker_failures = 1 allows; the run stops; "
        f"nothing was checkpointed in {run_dir} yet"
    ), line


def test_a_worker_lost_while_ray_train_launches_the_group_is_a_loss_not_a_traceback(tmp_path):
    """Ray Train waits for every worker's reply to "run the loop" outside its worker-failure checks: a worker
    killed just then ends ``fit`` with a ControllerError, never retried. The collective engine counts it as
    a loss (it launches the group again within engine.max_worker_failures) and names it in the one line."""
    from ray.exceptions import ActorDiedError
    from ray.train.v2.api.exceptions import ControllerError

    from distmaml.engine.elastic import group_failure, lost_while_launching

    lost = ControllerError(ActorDiedError())
    assert lost_while_launching(lost)
    assert not lost_while_launching(ControllerError(ValueError("a bug in a callback")))
    assert not lost_while_launching(ActorDiedError())
    config = load_config("sinusoid", ["engine.max_worker_failures=2"])
    failure = group_failure(lost, config, tmp_path / "run", "start-up x3")
    assert failure is not None
    assert str(failure).startswith("the worker group failed 3 times (last: a worker, while the group launched: ")
    assert str(failure).endswith(
        "; losses during start-up x3), more than engine.max_worker_failures = 2 allows; the run stops; "
        f"nothing was checkpointed in {tmp_path / 'run'} yet"
    )
    assert group_failure(ControllerError(ValueError("a bug")), config) is None
