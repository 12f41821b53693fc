"""ResNet-12: the papers' layout and size, its meta-gradient against plain autograd, its recipes, its bench rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datagen import make_imagefolder

from distmaml.bench.model import linear_fit, measure_model, model_table
from distmaml.cli import main
from distmaml.config import RECIPES_DIR, load_config
from distmaml.core import Algorithm, InnerLoop, meta_grad
from distmaml.data.imagefolder import prepare_imagefolder
from distmaml.models import ResNet12
from distmaml.run.assembly import build_network
from distmaml.typing import TaskBatch


def resnet12_reference(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-12 written out in the papers' order (leaky ReLU, then max-pool), torch's batch-norm on batch statistics."""

    def bn(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(x, None, None, p[f"{name}.weight"], p[f"{name}.bias"], training=True)

    for i in range(4):
        b = f"blocks.{i}"
        out = F.leaky_relu(bn(F.conv2d(x, p[f"{b}.conv1.weight"], padding=1), f"{b}.bn1"), 0.1)
        out = F.leaky_relu(bn(F.conv2d(out, p[f"{b}.conv2.weight"], padding=1), f"{b}.bn2"), 0.1)
        out = bn(F.conv2d(out, p[f"{b}.conv3.weight"], padding=1), f"{b}.bn3")
        shortcut = bn(F.conv2d(x, p[f"{b}.shortcut.0.weight"]), f"{b}.shortcut.1")
        x = F.max_pool2d(F.leaky_relu(out + shortcut, 0.1), 2)
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


def test_resnet12_has_the_papers_widths_and_12_5m_parameters():
    net = ResNet12(ways=5, in_channels=3, image_size=84, filters=64)
    params = dict(net.named_parameters())
    convs = {k: tuple(v.shape) for k, v in params.items() if v.dim() == 4}
    assert [convs[f"blocks.{i}.conv1.weight"][0] for i in range(4)] == [64, 160, 320, 640]
    assert convs["blocks.0.conv1.weight"] == (64, 3, 3, 3) and convs["blocks.3.conv3.weight"] == (640, 640, 3, 3)
    assert convs["blocks.2.shortcut.0.weight"] == (320, 160, 1, 1)
    assert len(convs) == 16  # 4 blocks of 3 convolutions and a 1x1 shortcut
    assert params["head.weight"].shape == (5, 640 * 5 * 5)  # 84 -> 42 -> 21 -> 10 -> 5
    body = sum(v.numel() for k, v in params.items() if not k.startswith("head."))
    assert (body, sum(v.numel() for v in params.values())) == (12_424_320, 12_504_325)
    assert not any(True for _ in net.buffers())  # batch statistics only, as conv4


def test_recipe_config_builds_the_papers_network():
    net = build_network(
        load_config("miniimagenet_5w1s_resnet12", ["data.family=noise", "data.channels=3", "data.image_size=84"])
    )
    assert isinstance(net, ResNet12) and sum(v.numel() for v in net.parameters()) == 12_504_325


def _tiny() -> ResNet12:
    torch.manual_seed(3)
    return ResNet12(ways=3, in_channels=3, image_size=16, filters=2).double()  # widths 2-5-10-20


def test_tiny_resnet12_computes_the_papers_function(float64):
    net = _tiny()
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(net(x), resnet12_reference(dict(net.named_parameters()), x), rtol=1e-12, atol=1e-12)


def _batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, ways * (shots + queries), 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.stack([torch.randperm(ways, generator=g).repeat(shots + queries) for _ in range(tasks)])
    n = ways * shots
    return TaskBatch(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


def plain_maml_gradient(params: dict[str, torch.Tensor], batch: TaskBatch, lr: float, steps: int):
    """Second-order MAML, by hand: inner steps with create_graph=True on the written-out network, summed over tasks."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(batch.num_tasks):
        p = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(resnet12_reference(p, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
        query = F.cross_entropy(resnet12_reference(p, batch.query_x[t]), batch.query_y[t])
        for k, g in zip(theta, torch.autograd.grad(query, list(theta.values()))):
            total[k] += g
    return total


@pytest.mark.parametrize("batching", ["loop", "loop_channels_last"])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_second_order_meta_gradient_equals_plain_autograd(batching, recompute):
    net, batch = _tiny(), _batch()
    params = {k: v.detach() for k, v in net.named_parameters()}
    expected = plain_maml_gradient(params, batch, lr=0.1, steps=2)
    algo = Algorithm(name="maml", inner=InnerLoop(lr=0.1, steps=2), recompute=recompute)
    got = meta_grad(net, params, batch, algo, batching=batching)
    assert got.grads.keys() == expected.keys()
    scale = max(float(v.abs().max()) for v in expected.values())
    assert scale > 1e-3  # a gradient worth comparing
    for k in expected:
        torch.testing.assert_close(got.grads[k], expected[k], rtol=1e-10, atol=1e-10 * scale, msg=k)


def test_resnet12_recipes_cite_their_settings_and_train(tmp_path):
    src = make_imagefolder(tmp_path / "tree", {f"n{i:02d}": 20 for i in range(15)}, size=(24, 30))
    prepare_imagefolder(src, tmp_path / "rgb", size=16, proportions=(1, 1, 1))
    for shots in (1, 5):
        name = f"miniimagenet_5w{shots}s_resnet12"
        c = load_config(name)
        assert (c.model.name, c.model.filters, c.algorithm, c.first_order) == ("resnet12", 64, "maml", False)
        assert (c.data.ways, c.data.shots, c.data.queries, c.meta.batch_size) == (5, shots, 15, 2)
        assert (c.inner.lr, c.inner.steps, c.inner.test_steps, c.meta.lr, c.meta.steps) == (0.01, 5, 5, 0.001, 50000)
        assert "MeTAL" in (RECIPES_DIR / f"{name}.yaml").read_text()
        sets = [f"data.path={tmp_path / 'rgb'}", "model.filters=2", "meta.steps=2", "meta.val_every=0"]
        sets += ["meta.test_tasks=2", "meta.val_tasks=2", "tracking.enabled=false", "batching=loop"]
        sets += ["inner.steps=1", "inner.test_steps=1", "data.queries=2"]
        out = tmp_path / f"run{shots}"
        args = ["train", "--config", name, "--workers", "0", "--quiet", "--out", str(out)]
        assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
        assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_linear_fit_extends_the_three_points():
    # memory = 10 + 2 per support image + 3 per query image, measured at 1 shot / 1 query, +1 shot, +1 query (5 ways)
    def mb(s: int, q: int) -> float:
        return 10 + 2 * 5 * s + 3 * 5 * q

    points = [{"shots": s, "queries": q, "peak_mb": mb(s, q)} for s, q in [(1, 1), (2, 1), (1, 2)]]
    assert linear_fit(points, "peak_mb", 5, 5, 15) == mb(5, 15)


def test_bench_model_rows_on_a_tiny_resnet12(tmp_path, capsys):
    """``--model resnet12`` through the CLI at a tiny width: a row per algorithm x steps x recompute, and the fit."""
    out = tmp_path / "bench.json"
    args = ["bench", "--algorithms", "maml,anil", "--model", "resnet12", "--inner-steps", "1,2", "--recompute"]
    args += ["--filters", "2", "--image-size", "16", "--memory-at", "2,3", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "5w1s1q MB" in printed and "5w2s3q MB (fit)" in printed
    rows = json.loads(out.read_text())["model_rows"]
    assert [(r["algorithm"], r["inner_steps"], r["recompute"]) for r in rows] == [
        (a, n, rc) for a in ("maml", "anil") for n in (1, 2) for rc in (False, True)
    ]
    for r in rows:
        assert [(p["shots"], p["queries"]) for p in r["points"]] == [(1, 1), (2, 1), (1, 2)]
        assert r["seconds_per_task"] > 0 and math.isfinite(r["at"]["cpu_seconds_per_task"])  # tiny steps: noise
        assert r["at"]["peak_mb"] == pytest.approx(linear_fit(r["points"], "peak_mb", 5, 2, 3))
    assert model_table(rows).count("\n") == len(rows) + 1


def test_bench_unknown_model_is_one_line(capsys):
    assert main(["bench", "--model", "resnet50"]) == 2
    assert capsys.readouterr().err.strip() == "distmaml: error: --model resnet50: allowed values are resnet12"


def test_measure_model_passes_overrides():
    rows = measure_model(
        "resnet12",
        ["fomaml"],
        [1],
        False,
        shots=1,
        queries=1,
        memory_at=None,
        extra=("model.filters=2", "data.image_size=16"),
    )
    assert len(rows) == 1 and "at" not in rows[0] and rows[0]["peak_mb"] >= 0
