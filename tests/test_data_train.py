"""Image classification end to end: conv4, the paper recipes, a glyph run, the meta-test protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datagen import make_imagefolder

from distmaml import load_checkpoint
from distmaml.cli import main
from distmaml.config import load_config
from distmaml.data.episodes import ImageTasks
from distmaml.data.family import default_glyphs_path
from distmaml.data.glyphs import GlyphSpec, prepare_glyphs
from distmaml.data.imagefolder import prepare_imagefolder
from distmaml.models import Conv4


def conv4_reference(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MAML paper's 4-conv net written out: (3x3 conv, batch-norm on batch statistics, ReLU, 2x2 pool) x 4."""
    for i in range(4):
        x = F.conv2d(x, p[f"features.{4 * i}.weight"], p[f"features.{4 * i}.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"features.{4 * i + 1}.weight"], p[f"features.{4 * i + 1}.bias"], True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


@pytest.mark.parametrize(("channels", "size", "filters", "side"), [(1, 28, 64, 1), (3, 84, 32, 5)])
def test_conv4_is_the_papers_network(channels, size, filters, side, float64):
    torch.manual_seed(0)
    net = Conv4(ways=5, in_channels=channels, image_size=size, filters=filters).double()
    params = dict(net.named_parameters())
    assert params["head.weight"].shape == (5, filters * side * side)
    convs = [k for k in params if k.endswith(".weight") and params[k].dim() == 4]
    assert [tuple(params[k].shape) for k in convs] == [(filters, channels, 3, 3)] + [(filters, filters, 3, 3)] * 3
    x = torch.rand(7, channels, size, size)
    torch.testing.assert_close(net(x), conv4_reference(params, x))  # batch statistics, no running ones
    assert not any(True for _ in net.buffers())


PAPER = {  # Finn et al. 2017, appendix A.1 (and github.com/cbfinn/maml main.py)
    "omniglot_5w1s": dict(ways=5, shots=1, batch=32, lr=0.4, steps=1, test_steps=3, filters=64),
    "omniglot_5w5s": dict(ways=5, shots=5, batch=32, lr=0.4, steps=1, test_steps=3, filters=64),
    "omniglot_20w1s": dict(ways=20, shots=1, batch=16, lr=0.1, steps=5, test_steps=5, filters=64),
    "miniimagenet_5w1s": dict(ways=5, shots=1, batch=4, lr=0.01, steps=5, test_steps=10, filters=32),
    "miniimagenet_5w5s": dict(ways=5, shots=5, batch=2, lr=0.01, steps=5, test_steps=10, filters=32),
}


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    prepare_glyphs(root / "grey", GlyphSpec(classes=64, drawings=10, size=16, val_classes=20, test_classes=20))
    src = make_imagefolder(root / "tree", {f"n{i:02d}": 20 for i in range(15)}, size=(24, 30))
    prepare_imagefolder(src, root / "rgb", size=16, proportions=(1, 1, 1))
    return {"omniglot": root / "grey", "miniimagenet": root / "rgb"}


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_paper_recipes_have_the_papers_settings_and_train(recipe, tiny_stores, tmp_path):
    want = PAPER[recipe]
    c = load_config(recipe)
    assert (c.data.family, c.data.ways, c.data.shots) == ("store", want["ways"], want["shots"])
    assert (c.meta.batch_size, c.inner.lr, c.inner.steps, c.inner.test_steps) == (
        want["batch"],
        want["lr"],
        want["steps"],
        want["test_steps"],
    )
    assert (c.model.name, c.model.filters, c.meta.test_tasks, c.meta.lr) == ("conv4", want["filters"], 600, 0.001)
    assert c.data.queries == (15 if recipe.startswith("miniimagenet") else want["shots"])
    store = tiny_stores[recipe.split("_")[0]]
    sets = [f"data.path={store}", "model.filters=4", "meta.steps=2", "meta.batch_size=2", "meta.val_every=0"]
    sets += ["meta.test_tasks=3", "meta.val_tasks=2", "tracking.enabled=false", "batching=loop"]
    args = ["train", "--config", recipe, "--workers", "0", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 2 and result["meta_test"]["tasks"] == 3


def adapted_accuracy(params, batch, t: int, lr: float, steps: int) -> float:
    """Query accuracy of task t after ``steps`` plain-autograd SGD steps on its support set."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(steps):
        loss = F.cross_entropy(conv4_reference(p, batch.support_x[t]), batch.support_y[t])
        grads = torch.autograd.grad(loss, list(p.values()))
        p = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), grads)}
    with torch.no_grad():
        return float((conv4_reference(p, batch.query_x[t]).argmax(-1) == batch.query_y[t]).float().mean())


def test_glyph_run_from_the_cli_beats_no_adaptation_and_meta_tests_as_the_papers(tmp_path, monkeypatch):
    """``--config glyphs_5w1s`` prepares its store on first use, learns, and reports the papers' protocol."""
    monkeypatch.setenv("DISTMAML_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    sets = ["meta.steps=20", "meta.batch_size=6", "model.filters=8", "meta.val_every=0", "meta.val_tasks=10"]
    sets += ["meta.test_tasks=100", "batching=loop"]
    args = ["train", "--config", "glyphs_5w1s", "--workers", "0", "--quiet", "--out", str(run)]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    assert (default_glyphs_path() / "metadata.json").is_file()  # prepared on first use
    result = json.loads((run / "result.json").read_text())
    mt, before = result["meta_test"], result["meta_test_unadapted"]
    assert mt["metric"] == "accuracy" and mt["tasks"] == 100 and result["inner_test_steps"] == 3
    assert mt["mean"] - mt["ci95"] > 0.2 + 0.1  # well above chance (1 in 5)
    assert mt["mean"] - mt["ci95"] > before["mean"] + before["ci95"]  # adaptation helps
    print(f"glyph run: adapted {mt['mean']:.3f} ± {mt['ci95']:.3f}, unadapted {before['mean']:.3f}")

    # the same numbers, computed independently: meta-test tasks (split 'test', step 0, ids 0..119),
    # 3 plain-autograd steps of inner.lr from the saved parameters, mean and 1.96 standard errors
    ckpt = load_checkpoint(run)
    tasks = ImageTasks(default_glyphs_path(), ways=5, shots=1, queries=5, seed=ckpt.config["seed"])
    batch = tasks.sample("test", 0, range(100))
    accs = torch.tensor([adapted_accuracy(ckpt.params, batch, t, 0.4, 3) for t in range(100)], dtype=torch.float64)
    assert abs(float(accs.mean()) - mt["mean"]) < 2e-3  # at most a near-tie flipped by rounding
    assert abs(1.96 * float(accs.std()) / math.sqrt(100) - mt["ci95"]) < 2e-3
    test_classes = set(tasks.info.splits["test"].classes)
    assert not test_classes & set(tasks.info.splits["train"].classes)

    assert main(["evaluate", "--checkpoint", str(run), "--tasks", "100"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["meta_test"] == mt and ev["meta_test_unadapted"] == before
