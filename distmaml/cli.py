"""``distmaml`` command line: train, evaluate, bench."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from distmaml import storage
from distmaml.config import Config, ConfigError, config_from_dict, load_config
from distmaml.results import describe
from distmaml.storage import Location, StorageError


class UserError(Exception):
    """An error in what the user asked for; printed as one line, no traceback."""


def make_engine(config: Config, address: str | None = None):  # type: ignore[no-untyped-def]
    if config.workers == 0:
        from distmaml.engine import InProcessEngine

        return InProcessEngine(config)
    from distmaml.engine.ray_engine import RayEngine

    return RayEngine(config, address)


def _config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.set or [])
    if getattr(args, "workers", None) is not None:
        overrides.append(f"workers={args.workers}")
    return with_absolute_uri(load_config(args.config, overrides))


def with_absolute_uri(config: Config) -> Config:
    """Pins a relative ``tracking.uri`` to this directory before any worker or trial sees the config."""
    if config.tracking.enabled:
        from distmaml.tracking.uri import absolute_uri

        config.tracking.uri = absolute_uri(config.tracking.uri)
    return config


def tracking_callbacks(config: Config, **kwargs: Any) -> list[Any]:
    """``[MlflowCallback]`` when ``tracking.enabled``, else ``[]``."""
    if not config.tracking.enabled:
        return []
    from distmaml.tracking import MlflowCallback

    return [MlflowCallback(config, **kwargs)]


def print_meta_test(result: dict[str, Any], out: Any = sys.stdout) -> None:
    mt, before = result["meta_test"], result.get("meta_test_unadapted")
    steps = result.get("inner_test_steps")
    print(f"meta-test, {mt['tasks']} held-out tasks, {steps} inner steps: {describe(mt)} (95% interval)", file=out)
    if before:
        print(f"the same tasks without adaptation:            {describe(before)}", file=out)


def cmd_train(args: argparse.Namespace) -> int:
    from distmaml.trainer import Trainer

    run_dir: Location | None
    if args.resume:
        from distmaml.checkpoint import load_checkpoint

        if args.set or args.workers is not None:
            raise UserError("--resume continues the run with its own config; drop --set and --workers")
        run_dir = storage.location(args.resume)
        config = config_from_dict(load_checkpoint(run_dir).config)
        storage.check_writable(run_dir, "--resume")
    else:
        config = _config_from_args(args)
        run_dir = storage.location(args.out) if args.out else None
        if run_dir is not None:
            if storage.listdir(storage.join(run_dir, "checkpoints")):
                raise UserError(f"--out {run_dir}: already holds a run; use --resume {run_dir} or another folder")
            storage.check_writable(run_dir, "--out")  # before any engine or worker starts
    callbacks = tracking_callbacks(config)
    engine = make_engine(config, args.address)
    try:
        trainer = Trainer(
            config, engine, run_dir, callbacks=callbacks, progress=not args.quiet, resume=bool(args.resume)
        )
        result = trainer.fit()
    except BaseException:
        for cb in callbacks:
            cb.fail()
        raise
    finally:
        engine.close()
    print_meta_test(result)
    if run_dir is not None:
        print(f"run written to {run_dir}")
    if "mlflow_run_id" in result:
        print(f"MLflow run {result['mlflow_run_id']} in {config.tracking.uri}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distmaml.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, tasks=args.tasks, overrides=args.set or [])
    print_meta_test(result)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from distmaml.tune import load_space, render_text, run_sweep, with_overrides

    spec = with_overrides(load_space(args.space), num_samples=args.trials, overrides=args.set or [])
    result = run_sweep(spec, address=args.address, storage=args.storage, verbose=0 if args.quiet else 1)
    print(f"\n{len(result.rows)} trials of {spec.name}, best first by {spec.metric} ({spec.mode}):")
    print(render_text(result.rows, spec))
    if result.best is None:
        raise UserError(f"no trial of {spec.name} reported {spec.metric}; see the trial errors above")
    print(f"best checkpoint: {result.best.checkpoint}")
    print(f"  meta-test it:  distmaml evaluate --checkpoint {result.best.checkpoint}")
    if result.parent_run_id:
        print(f"MLflow parent run {result.parent_run_id} (experiment {spec.name!r})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distmaml.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distmaml", description="Distributed MAML on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train one run")
    train.add_argument("--config", default="sinusoid", help="built-in recipe name or YAML path (default: sinusoid)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key; repeatable")
    train.add_argument("--workers", type=int, help="worker actors (0: compute in this process)")
    train.add_argument("--address", help="Ray address: local, auto, or ray://host:port")
    train.add_argument(
        "--out", help="run directory for config.yaml, checkpoints and result.json: a folder, s3://... or gs://..."
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint (folder or URI)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="meta-test a trained run")
    ev.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory or checkpoint file")
    ev.add_argument("--tasks", type=int, default=None, help="meta-test tasks (default: the run's meta.test_tasks)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. inner.test_steps=20")
    ev.set_defaults(func=cmd_evaluate)

    tn = sub.add_parser("tune", help="a Ray Tune sweep over a search-space file, tracked in MLflow")
    tn.add_argument("--space", required=True, help="search-space YAML, e.g. tune_spaces/sinusoid.yaml")
    tn.add_argument("--trials", type=int, default=None, help="number of trials (default: the file's num_samples)")
    tn.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed override of the base config; repeatable")
    tn.add_argument("--address", help="Ray address: auto, ray://host:port (default: start Ray here)")
    tn.add_argument("--storage", default="ray_results", help="Tune storage folder for trial checkpoints")
    tn.add_argument("--quiet", action="store_true", help="no Tune progress table")
    tn.set_defaults(func=cmd_tune)

    bench = sub.add_parser("bench", help="time a meta-step of the core against a per-task baseline")
    bench.add_argument("--configs", default="sinusoid,omniglot", help="comma-separated: sinusoid, omniglot")
    bench.add_argument("--threads", default="1", help="torch threads per measurement, comma-separated")
    bench.add_argument("--steps", type=int, default=0, help="timed meta-steps (0: chosen per config)")
    bench.add_argument("--workers", default="", help="Ray engine worker counts to compare, e.g. 1,2")
    bench.add_argument("--engine-steps", type=int, default=0, help="timed steps per worker count (0: --steps)")
    bench.add_argument("--batchings", action="store_true", help="also time the core forced to vmap and to loop")
    bench.add_argument("--json", default="bench.json", help="where to write the JSON results")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, UserError, FileNotFoundError, ValueError, StorageError) as e:
        print(f"distmaml: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distmaml: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from distmaml.engine.placement import EngineError
        from distmaml.trainer import NonFiniteError

        if isinstance(e, (NonFiniteError, EngineError)):
            print(f"distmaml: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
