"""A user's own network and task family, in one process: the meta-gradient through torch's batch-norm
(float64, against plain autograd, every batching), and every refusal in one line."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distmaml.config import ConfigError, load_config
from distmaml.core import meta_grad
from distmaml.core.algorithm import Algorithm, InnerLoop
from distmaml.core.batching import BATCHINGS
from distmaml.core.batchnorm import MetaBatchNorm
from distmaml.run.assembly import assemble, build_family, build_network
from distmaml.run.usercode import UserCodeError
from distmaml.typing import TaskBatch


class ConvBN(nn.Module):
    """Conv -> torch BatchNorm2d -> a plain function -> flatten -> Linear -> BatchNorm1d -> Linear, with a fixed buffer."""

    def __init__(self, ways: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, ways)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.bn(self.conv(x))), 2)
        return self.head(F.softplus(self.bn1(self.fc(h.flatten(1))) * self.scale))


def _config(*sets):
    return load_config("sinusoid", ["precision=float64", "tracking.enabled=false", "workers=0", *sets])


def _maml_by_autograd(model, params, batch, lr, steps):
    """Second-order MAML written out: per task, `steps` inner steps with create_graph, the query loss, summed."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for t in range(batch.num_tasks):
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
    return dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))


@pytest.mark.parametrize(
    "batching, recompute", [*((b, False) for b in BATCHINGS), ("loop", True), ("vmap", True)], ids=str
)
def test_torch_batchnorm_meta_gradient_equals_plain_autograd_in_float64(batching, recompute):
    torch.manual_seed(0)
    original = ConvBN().double()
    net = build_network(_config(), model=lambda c: copy.deepcopy(original))
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in net.modules())
    assert sum(isinstance(m, MetaBatchNorm) for m in net.modules()) == 2
    assert [k for k, _ in net.named_buffers()] == ["scale"]  # running statistics gone, the user's buffer kept
    params = {k: v.detach().clone() for k, v in original.named_parameters()}
    assert list(dict(net.named_parameters())) == list(params)  # same names: a checkpoint reads the same
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(
        torch.randn(4, 6, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 6), generator=g),
        torch.randn(4, 9, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 9), generator=g),
    )
    algo = Algorithm(name="maml", inner=InnerLoop(lr=0.3, steps=2, loss="cross_entropy"), recompute=recompute)
    ours = meta_grad(net, params, batch, algo, batching=batching).grads
    # the reference: torch's own BatchNorm layers in training mode (batch statistics), plain autograd
    reference = _maml_by_autograd(copy.deepcopy(original).train(), params, batch, lr=0.3, steps=2)
    for k in params:
        assert torch.allclose(ours[k], reference[k], atol=1e-10, rtol=1e-9), (k, (ours[k] - reference[k]).abs().max())
    assert all(reference[k].abs().max() > 1e-6 for k in ("bn.weight", "bn1.bias", "conv.weight"))


def _refusal(factory, *sets):
    with pytest.raises(UserCodeError) as e:
        config = _config(*sets)
        net = build_network(config, model=factory)
        from distmaml.run.usercode import check_run

        check_run(config, net, build_family(config), user_model=True, user_family=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_dropout_is_refused_with_the_layer_and_the_fix():
    msg = _refusal(lambda c: nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.2), nn.Linear(8, 1)))
    assert "layer '1' is Dropout(p=0.2)" in msg and "remove it or set p=0" in msg


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(self.a(x) + 0.1 * torch.randn(x.shape[0], 8, dtype=x.dtype))


def test_randomness_in_a_forward_pass_is_refused():
    wrapped = lambda c: nn.Sequential(nn.Linear(1, 1), Noisy())  # noqa: E731
    msg = _refusal(wrapped)
    assert "layer '1' (Noisy) gives different outputs for the same input" in msg and "remove it" in msg


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_a_buffer_updated_by_the_forward_pass_is_refused():
    msg = _refusal(lambda c: nn.Sequential(nn.Linear(1, 1), Counter()))
    assert "layer '1' (Counter) changes its buffer 'calls' in the forward pass" in msg


def test_other_refusals():
    assert "returned an object of type str, not a torch.nn.Module" in _refusal(lambda c: "net")
    assert "has affine=False" in _refusal(lambda c: nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4, affine=False)))
    assert "output (10, 3) and a task's targets (10, 1) differ in shape" in _refusal(lambda c: nn.Linear(1, 3))


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """A package in the current directory (not on the Python path otherwise), as `python -m` finds it."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "fams.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def net(config):
                return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

            def not_a_net(config):
                return 42

            class Lines:
                loss = "mse"
                def __init__(self, config):
                    self.seed = config.seed
                def sample(self, split, step, ids):
                    out = []
                    for i in ids:
                        g = torch.Generator().manual_seed(hash((self.seed, split, step, i)) % 2**31)
                        a = torch.randn(2, generator=g)
                        x = torch.rand(8, 1, generator=g)
                        out.append((x[:4], a[0] * x[:4] + a[1], x[4:], a[0] * x[4:] + a[1]))
                    return tuple(torch.stack(p) for p in zip(*out))

            class WrongShapes(Lines):
                def sample(self, split, step, ids):
                    sx, sy, qx, qy = super().sample(split, step, ids)
                    return sx, sy[:, :3], qx, qy

            class L1(Lines):
                loss = "l1"

            class Impure(Lines):
                def sample(self, split, step, ids):
                    sx, sy, qx, qy = super().sample(split, step, ids)
                    return sx, sy + torch.rand(()), qx, qy

            class Coupled(Lines):
                def sample(self, split, step, ids):
                    sx, sy, qx, qy = super().sample(split, step, ids)
                    return sx, sy + len(ids), qx, qy + len(ids)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def _assembly_error(*sets):
    with pytest.raises((UserCodeError, ConfigError)) as e:
        assemble(_config("meta.steps=1", *sets))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_family_refusals(userpkg):
    net = "model.name=mypkg.fams:net"
    assert "returned shapes (2, 4, 1), (2, 3, 1), (2, 4, 1), (2, 4, 1); want" in _assembly_error(
        net, "data.family=mypkg.fams:WrongShapes"
    )
    assert "its loss = 'l1' is not one distmaml knows" in _assembly_error(net, "data.family=mypkg.fams:L1")
    assert "two calls of sample('train', 0, [0, 1]) returned different tasks" in _assembly_error(
        net, "data.family=mypkg.fams:Impure"
    )
    assert "task 1 of sample('train', 0, [0, 1]) differs from sample('train', 0, [1])" in _assembly_error(
        net, "data.family=mypkg.fams:Coupled"
    )
    assert "no module 'nopkg'" in _assembly_error("model.name=nopkg.nets:make")
    assert "mypkg.fams has no attribute 'nets'; it defines" in _assembly_error("model.name=mypkg.fams:nets")
    assert "returned an object of type int, not a torch.nn.Module" in _assembly_error("model.name=mypkg.fams:not_a_net")


def test_a_user_family_runs_in_process_and_resolves_its_loss(userpkg):
    config = _config("meta.steps=3", "model.name=mypkg.fams:net", "data.family=mypkg.fams:Lines", "meta.test_tasks=4")
    assert config.data.loss is None
    run = assemble(config)
    assert run.config.data.loss == "mse"
    result = run.fit(progress=False)
    assert result["meta_test"]["metric"] == "mse" and result["meta_test"]["tasks"] == 4


def test_own_images_through_prepare_imagefolder_with_an_own_network(tmp_path, monkeypatch):
    """The README's way to a custom image dataset: `prepare imagefolder`, data.family=store, model.name=pkg:attr."""
    import json

    from datagen import make_imagefolder

    from distmaml.cli import main

    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "birds", {f"bird{i}": 6 for i in range(12)})
    assert main(["prepare", "imagefolder", "--source", "birds", "--out", "store", "--size", "16",
                 "--proportions", "0.5,0.25,0.25"]) == 0  # fmt: skip
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "from distmaml.data.family import image_shape\n"
        "def small(config):\n"
        "    c, h, w = image_shape(config)\n"
        "    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, config.data.ways))\n"
    )
    sets = ["data.path=store", "model.name=mynets:small", "meta.steps=2", "data.ways=3", "data.shots=1",
            "data.queries=2", "meta.batch_size=2", "meta.val_tasks=2", "meta.test_tasks=4", "tracking.enabled=false"]  # fmt: skip
    argv = ["train", "--config", "miniimagenet_5w1s", "--workers", "0", "--quiet", "--out", "run"]
    assert main([*argv, *(a for x in sets for a in ("--set", x))]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["meta_test"]["metric"] == "accuracy" and result["meta_test"]["tasks"] == 4
    sys.modules.pop("mynets", None)
