"""The outer loop: Adam on the meta-parameters, validation, checkpoints, meta-test.

The trainer holds the meta-parameters and the optimizer; an engine computes
the summed meta-gradient of each step's tasks (in-process or on Ray actors);
the trainer divides once by the meta-batch size and steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from distmaml import storage
from distmaml.config import Config, ConfigError, config_from_dict, dump_config
from distmaml.core.losses import METRIC_NAME
from distmaml.engine.protocol import Engine, EvalShard, ParamLayout
from distmaml.errors import CANNOT_GO_ON, DistmamlError
from distmaml.fastpath import adam as fused_adam
from distmaml.machine import interrupt
from distmaml.run.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from distmaml.run.results import reference_entry, summarize
from distmaml.run.usercode import resolve_loss
from distmaml.storage import Location, atomic_write_text, write_json
from distmaml.typing import Params


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """MAML++'s cosine annealing of meta.lr to mamlpp.min_lr over meta.steps (stepped per meta-step), or None."""
    if config.algorithm == "mamlpp" and config.mamlpp.cosine_lr:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.meta.steps, eta_min=config.mamlpp.min_lr
        )
    return None


class Callback:
    """Hooks for tracking and sweeps; every method is optional."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None: ...
    def on_checkpoint(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None:
        """After each checkpoint of the training loop (and its validation, whose metrics ``metrics`` then
        holds with the step's); ``checkpoint`` is None without a run directory."""

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None: ...


class NonFiniteError(DistmamlError, RuntimeError):
    """The meta-loss, the meta-gradient or an evaluation stopped being finite; the last good state is checkpointed."""

    exit_code = CANNOT_GO_ON


def check_scores(scores: EvalShard, config: Config, what: str, steps: int, saved: Location | None = None) -> None:
    """Raises ``NonFiniteError`` naming the settings to change if any adapted score is NaN or infinite.

    Learned inner rates fitted to ``inner.steps`` steps, or a large
    ``inner.lr``, can diverge over more evaluation steps.
    """
    bad = int((~torch.isfinite(scores.after)).sum())
    if not bad:
        return
    n = int(scores.after.numel())
    fix = f"set inner.test_steps={config.inner.steps} (now {steps})" if steps > config.inner.steps else ""
    fix = f"{fix} or " if fix else ""
    where = f"; the parameters are saved in {saved}" if saved is not None else ""
    raise NonFiniteError(
        f"{what}: adaptation turned {bad} of {n} tasks non-finite after {steps} inner steps; "
        f"{fix}lower inner.lr (now {config.inner.lr}){where}"
    )


@dataclass
class History:
    train: list[tuple[int, float, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


class Trainer:
    """Meta-trains ``config`` with ``engine``; writes to ``run_dir`` if given.

    ``run_dir`` is a local folder or a URI (``s3://bucket/runs/a``, see
    ``distmaml.storage``); it is checked writable before anything else happens.

    ``params`` are the initial meta-parameters (``assembly.assemble`` builds
    them with the engine; the trainer optimises them in place).

    Example:
        >>> run = assemble(load_config("sinusoid", ["meta.steps=200", "workers=0"]))
        >>> result = Trainer(run.config, run.engine, "runs/s", params=run.params).fit()
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        run_dir: str | Path | None = None,
        *,
        params: Params,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        resume: bool = False,
        echo: bool = True,
    ) -> None:
        self.config = config
        self.engine = engine
        self.run_dir = storage.location(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            storage.check_writable(self.run_dir, "--resume" if resume else "--out")
        self.callbacks = callbacks or []
        self.progress = progress
        self.echo = echo
        """Print each validation line (a collective group's workers other than rank 0 do not)."""
        self.metric = METRIC_NAME[resolve_loss(config)]
        self.layout = ParamLayout(params)
        # The meta-parameters live in one flat tensor, and ``params`` (the
        # caller's dict, updated in place) holds views of it: the engines get
        # it without a copy, and Adam steps one tensor with its fused kernel.
        # Per step on the sinusoid MLP (1,761 entries in 6 tensors), whose
        # meta-step computes in about a millisecond: 157 us for the per-tensor
        # loop, 50 us fused over the 6, 33 us fused over one flat tensor; the
        # same values to the last bit in float64. Its gradient is one flat
        # buffer too, divided into in place each step.
        first = next(iter(params.values()))
        self._flat = self.layout.flatten({k: v.detach() for k, v in params.items()})
        params.update(self.layout.unflatten(self._flat))
        self.params = params
        self._flat.grad = torch.zeros_like(self._flat)
        for k, g in self.layout.unflatten(self._flat.grad).items():
            params[k].grad = g  # each tensor's gradient of the last step, a view as well
        fused = first.device.type in ("cpu", "cuda") and first.is_floating_point()
        self.optimizer = torch.optim.Adam([self._flat], lr=config.meta.lr, fused=fused or None)
        self.scheduler = make_scheduler(config, self.optimizer)
        self.step = 0
        self.history = History()
        self.tasks_per_second = 0.0
        self.last_checkpoint: Location | None = None
        self.checkpoint_step: int | None = None
        """The step ``last_checkpoint`` holds."""
        self.resumed = resume
        if resume:
            self._resume()

    # -- state ---------------------------------------------------------------
    def _resume(self) -> None:
        if self.run_dir is None:
            raise ValueError("resume needs a run directory")
        self.restore(load_checkpoint(self.run_dir))

    def restore(self, ckpt: Checkpoint) -> None:
        """Continues from ``ckpt`` (its config must be this run's): parameters, optimizer, schedule, step."""
        self.resumed = True
        saved = config_from_dict(ckpt.config)
        if saved.to_dict() != self.config.to_dict():
            changed = sorted(k for k, v in saved.flat().items() if self.config.flat().get(k) != v)
            raise ConfigError(
                f"--resume {self.run_dir or ckpt.path}: the config differs from the checkpoint's in {', '.join(changed)}; "
                "resume with the run's own config (omit --config and --set)"
            )
        with torch.no_grad():
            for k, v in ckpt.params.items():
                self.params[k].copy_(v)
        self._load_optimizer_state(ckpt.optimizer)
        if self.scheduler is not None:
            if ckpt.scheduler is None:
                raise CheckpointError(
                    f"--resume {self.run_dir or ckpt.path}: the checkpoint has no learning-rate schedule state"
                )
            self.scheduler.load_state_dict(ckpt.scheduler)
        self.step = self.checkpoint_step = ckpt.step
        self.last_checkpoint = ckpt.path

    @property
    def flat(self) -> Tensor:
        """The meta-parameters as one flat tensor: the live one, which the next outer step changes."""
        return self._flat

    def optimizer_state(self) -> dict[str, Any]:
        """Adam's ``state_dict`` as if it stepped each named tensor (the checkpoint's form, the
        parameters in ``self.layout.names`` order): it steps one flat tensor."""
        saved = self.optimizer.state_dict()
        group = {**saved["param_groups"][0], "params": list(range(len(self.layout.names)))}
        state: dict[int, dict[str, Tensor]] = {}
        if saved["state"]:
            flat = saved["state"][0]
            parts = {k: self.layout.unflatten(v) for k, v in flat.items() if k != "step"}
            state = {
                i: {"step": flat["step"].clone(), **{k: parts[k][name].clone() for k in parts}}
                for i, name in enumerate(self.layout.names)
            }
        return {"state": state, "param_groups": [group]}

    def _load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Loads ``optimizer_state``'s form (per named tensor) into the flat tensor's Adam."""
        n = len(self.layout.names)
        groups = saved["param_groups"]
        if len(groups) != 1 or list(groups[0]["params"]) != list(range(n)):
            raise CheckpointError(
                f"the checkpoint's optimizer state is not Adam's over this run's {n} parameter tensors"
            )
        state: dict[int, dict[str, Tensor]] = {}
        if saved["state"]:
            per = [saved["state"][i] for i in range(n)]
            state = {
                0: {
                    "step": per[0]["step"],
                    **{
                        k: self.layout.flatten({name: s[k] for name, s in zip(self.layout.names, per)})
                        for k in per[0]
                        if k != "step"
                    },
                }
            }
        group = {**groups[0], "params": [0], "fused": self.optimizer.param_groups[0]["fused"]}
        self.optimizer.load_state_dict({"state": state, "param_groups": [group]})

    def checkpoint(self) -> Location | None:
        if self.run_dir is None:
            return None
        with interrupt.atomic():  # a stop request waits for the write and the pruning
            self.last_checkpoint = save_checkpoint(
                self.run_dir,
                self.step,
                self.params,
                self.optimizer_state(),
                self.config.to_dict(),
                keep=self.config.meta.keep_checkpoints,
                scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            )
            self.checkpoint_step = self.step
        return self.last_checkpoint

    # -- one meta-step --------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Computes step ``self.step``'s meta-gradient and takes the outer step."""
        t = self.config.meta.batch_size
        shard = self.engine.meta_batch(self.flat, self.step, t)
        if shard.tasks != t:
            raise RuntimeError(f"engine returned {shard.tasks} tasks for a meta-batch of {t}")
        grad = torch.div(shard.grad, t, out=self._flat.grad)
        loss = shard.loss / t
        # A sum in float64 is finite exactly when every entry is (no float32 sum can overflow it).
        finite = math.isfinite(loss) and (
            math.isfinite(grad.sum(dtype=torch.float64)) or bool(torch.isfinite(grad).all())  # (float64's overflow)
        )
        if not finite:
            # Checked before the optimizer step: the parameters are still the last good ones.
            saved = self.checkpoint()
            where = f"; the last good state (step {self.step}) is saved in {saved}" if saved is not None else ""
            raise NonFiniteError(
                f"meta-step {self.step}: the meta-loss or meta-gradient is not finite (loss {loss}); "
                f"lower inner.lr (now {self.config.inner.lr}) or meta.lr (now {self.config.meta.lr}){where}"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        with interrupt.atomic():  # a SIGTERM here waits: the step is applied whole, then counted
            fused_adam.step(self.optimizer, self._flat)  # the kernel directly where proven (fastpath.adam)
            if self.scheduler is not None:
                self.scheduler.step()
            self.step += 1
        return {"loss": loss, self.metric: shard.metric / t, "meta_lr": lr}

    def validate(self) -> dict[str, float]:
        steps = self.config.test_steps
        scores = self.engine.evaluate(self.flat, "val", self.config.meta.val_tasks, steps)
        check_scores(scores, self.config, f"validation at meta-step {self.step}", steps, self.last_checkpoint)
        return {f"val_{self.metric}": float(scores.after.double().mean())}

    # -- the run ----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Runs to ``meta.steps``, meta-tests, writes ``result.json``; returns it.

        Stopped by a signal (see ``distmaml.machine.interrupt``), it abandons the step in
        flight, checkpoints the last completed one and raises ``Interrupted``
        saying which step that is and where it was saved.
        """
        try:
            return self._fit()
        except KeyboardInterrupt as e:
            stop = interrupt.stop_request(e)
            if stop is None:  # not through our handlers: it may have struck mid-update, save nothing
                raise
            stop.step, stop.run_dir = self.step, self.run_dir
            stop.checkpoint = self.last_checkpoint if self.checkpoint_step == self.step else self.checkpoint()
            raise stop from None

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.run_dir is not None:
            storage.makedirs(self.run_dir)
            atomic_write_text(storage.join(self.run_dir, "config.yaml"), dump_config(cfg))
        for cb in self.callbacks:
            cb.on_start(self)
        bar = tqdm(
            total=cfg.meta.steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < cfg.meta.steps:
                metrics = self.train_step()
                elapsed = time.perf_counter() - start
                self.tasks_per_second = (self.step - start_step) * cfg.meta.batch_size / max(elapsed, 1e-9)
                metrics["tasks_per_second"] = self.tasks_per_second
                self.history.train.append((self.step, metrics["loss"], metrics[self.metric]))
                for cb in self.callbacks:
                    cb.on_step(self.step, metrics)
                if not bar.disable:  # formatting it costs a tenth of a small model's outer step
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}", tasks_s=f"{self.tasks_per_second:.0f}", refresh=False
                    )
                last = self.step == cfg.meta.steps
                validate_now = cfg.meta.val_every and self.step % cfg.meta.val_every == 0
                save_now = self.step % cfg.meta.checkpoint_every == 0 or last or validate_now
                if save_now:
                    self.checkpoint()
                if validate_now or last:
                    val = self.validate()
                    self.history.val.append((self.step, next(iter(val.values()))))
                    if self.echo:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    for cb in self.callbacks:
                        cb.on_validation(self.step, val, self.last_checkpoint)
                    metrics = {**metrics, **val}
                if save_now:
                    for cb in self.callbacks:
                        cb.on_checkpoint(self.step, metrics, self.last_checkpoint)
        finally:
            bar.close()
        result = self.result(self.meta_test())
        if self.run_dir is not None:
            write_json(storage.join(self.run_dir, "result.json"), result)
        for cb in self.callbacks:
            cb.on_end(self, result)
        return result

    def meta_test(self, tasks: int | None = None) -> EvalShard:
        n = tasks or self.config.meta.test_tasks
        scores = self.engine.evaluate(self.flat, "test", n, self.config.test_steps)
        check_scores(scores, self.config, "meta-test", self.config.test_steps, self.last_checkpoint)
        return scores

    def result(self, scores: EvalShard) -> dict[str, Any]:
        return {
            "steps": self.step,
            "workers": self.engine.workers,
            "tasks_per_second": self.tasks_per_second,
            "meta_test": summarize(scores.after, self.metric),
            "meta_test_unadapted": summarize(scores.before, self.metric),
            "inner_test_steps": self.config.test_steps,
            "worker_replacements": self.engine.replacements,
            "batching": self.engine.batching(),
            "validation": [{"step": s, "metric": v} for s, v in self.history.val],
            **reference_entry(self.config),
        }
