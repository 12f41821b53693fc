"""A short in-process meta-training run, its run directory, evaluate and load_checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from reference import reference_scores

import distmaml
from distmaml.cli import main
from distmaml.config import load_config
from distmaml.models import sinusoid_mlp
from distmaml.run.assembly import assemble
from distmaml.tasks import SinusoidTasks


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    code = main(
        [
            "train",
            "--quiet",
            "--workers",
            "0",
            "--out",
            str(run_dir),
            "--set",
            "meta.steps=600",
            "--set",
            "meta.val_every=300",
            "--set",
            "meta.checkpoint_every=200",
            "--set",
            "meta.keep_checkpoints=2",
            "--set",
            "meta.test_tasks=200",
            "--set",
            "tracking.enabled=false",
        ]
    )
    assert code == 0
    return run_dir


def test_meta_training_lowers_post_adaptation_mse(short_run):
    result = json.loads((short_run / "result.json").read_text())
    mt, before = result["meta_test"], result["meta_test_unadapted"]
    assert set(mt) == {"metric", "mean", "ci95", "tasks"}
    assert mt["metric"] == "mse" and mt["tasks"] == 200 and result["steps"] == 600
    assert before["mean"] > 2.0  # unadapted: about the variance of A sin(x - phi)
    assert mt["mean"] < 0.5 * before["mean"]
    assert result["tasks_per_second"] > 0 and result["workers"] == 0
    assert result["batching"]["choice"] in result["batching"]["seconds"]  # timed at the first meta-step


def test_run_directory_layout(short_run):
    assert (short_run / "config.yaml").is_file()
    names = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert names == ["step_000000400.pt", "step_000000600.pt"]  # keep the newest 2
    assert not list(short_run.rglob("*.tmp"))


def test_load_checkpoint_and_evaluate(short_run):
    ckpt = distmaml.load_checkpoint(short_run)
    assert ckpt.step == 600 and ckpt.config["meta"]["steps"] == 600
    assert ckpt.config["inner"]["test_steps"] == 10  # null in the recipe: resolved to MAML's 10 in config.yaml
    assert set(ckpt.params) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert main(["evaluate", "--checkpoint", str(short_run), "--tasks", "200"]) == 0
    ev = json.loads((short_run / "eval.json").read_text())
    res = json.loads((short_run / "result.json").read_text())
    # an independent meta-test: the same 200 held-out tasks, 10 plain SGD steps in float64 (tests/reference.py)
    model = sinusoid_mlp().double()
    params = {k: v.double() for k, v in ckpt.params.items()}
    batch = SinusoidTasks(shots=10, queries=10, seed=0).sample("test", 0, range(200)).to(dtype=torch.float64)
    before, after = reference_scores(model, params, batch, name="maml", lr=0.01, steps=10, train_steps=1, loss="mse")
    assert ev["inner_test_steps"] == res["inner_test_steps"] == 10
    for got in (ev, res):
        assert got["meta_test"]["metric"] == "mse" and got["meta_test"]["tasks"] == 200
        assert got["meta_test"]["mean"] == pytest.approx(float(after.mean()), rel=1e-4)
        assert got["meta_test_unadapted"]["mean"] == pytest.approx(float(before.mean()), rel=1e-4)
        ci = 1.96 * float(after.std()) / 200**0.5
        assert got["meta_test"]["ci95"] == pytest.approx(ci, rel=1e-3)


def test_corrupt_newest_checkpoint_falls_back(short_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(short_run, copy)
    newest = sorted((copy / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    ckpt = distmaml.load_checkpoint(copy)
    assert ckpt.step == 400
    assert "unreadable" in capsys.readouterr().err


def test_resume_equals_uninterrupted(tmp_path):
    overrides = [
        "workers=0",
        "meta.steps=30",
        "meta.val_every=0",
        "meta.checkpoint_every=10",
        "precision=float64",
        "meta.test_tasks=10",
        "meta.val_tasks=10",
        "tracking.enabled=false",
    ]
    cfg = load_config("sinusoid", overrides)
    whole = assemble(cfg).trainer(tmp_path / "a", progress=False)
    whole.fit()
    # a run stopped after 20 steps, then resumed
    cfg20 = load_config("sinusoid", overrides)
    part = assemble(cfg20).trainer(tmp_path / "b", progress=False)
    while part.step < 20:
        part.train_step()
        if part.step % 10 == 0:
            part.checkpoint()
    resumed = assemble(cfg).trainer(tmp_path / "b", progress=False, resume=True)
    assert resumed.step == 20
    resumed.fit()
    for k in whole.params:
        torch.testing.assert_close(resumed.params[k], whole.params[k], rtol=0, atol=1e-12)


class _GivenGradients:
    """An engine whose meta-gradient is a fixed random sequence (the outer step alone is under test)."""

    workers, replacements = 1, 0

    def __init__(self, numel):
        self.numel = numel

    def meta_batch(self, flat, step, batch_size):
        from distmaml.engine.protocol import GradShard

        g = torch.randn(self.numel, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        return GradShard(g * batch_size, 1.0, 1.0, batch_size)


def test_the_outer_step_is_torch_adam_with_its_schedule_and_resumes_alike(tmp_path):
    """The trainer's outer step (fused Adam over one flat tensor, its kernel called directly after the first
    step) equals torch.optim.Adam's per-tensor step with MAML++'s cosine schedule over 30 steps, float64; a
    trainer resumed from the checkpoint at step 12 goes on identically."""
    from distmaml.run.assembly import init_meta_params
    from distmaml.run.trainer import Trainer, make_scheduler

    config = load_config(
        "sinusoid",
        ["algorithm=mamlpp", "precision=float64", "meta.steps=30", "meta.lr=0.01", "tracking.enabled=false"],
    )
    assert config.mamlpp.cosine_lr
    params = init_meta_params(config, sinusoid_mlp().double())
    reference = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    numel = sum(v.numel() for v in params.values())
    trainer = Trainer(config, _GivenGradients(numel), tmp_path / "run", params=params, progress=False)
    adam = torch.optim.Adam(reference.values(), lr=config.meta.lr)
    schedule = make_scheduler(config, adam)
    for step in range(30):
        g = torch.randn(numel, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        for p, part in zip(reference.values(), torch.split(g, [v.numel() for v in reference.values()])):
            p.grad = part.view(p.shape).clone()
        adam.step()
        schedule.step()
        trainer.train_step()
        if step == 11:
            trainer.checkpoint()
    for k, v in reference.items():
        torch.testing.assert_close(trainer.params[k], v.detach(), rtol=0, atol=1e-15, msg=k)
    assert trainer.optimizer.param_groups[0]["lr"] == adam.param_groups[0]["lr"] < config.meta.lr

    saved = distmaml.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000000012.pt")
    resumed = Trainer(
        config, _GivenGradients(numel), None, params=init_meta_params(config, sinusoid_mlp().double()), progress=False
    )
    resumed.restore(saved)
    while resumed.step < 30:
        resumed.train_step()
    for k, v in trainer.params.items():
        assert torch.equal(resumed.params[k], v), k
    # the checkpoint's optimizer state is torch.optim.Adam's per-tensor form
    assert list(saved.optimizer["state"]) == list(range(len(params)))
    assert saved.optimizer["state"][2]["exp_avg"].shape == params[list(params)[2]].shape
