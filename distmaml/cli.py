"""``distmaml`` command line: train, evaluate, recipes, tune, sync, bench, prepare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distmaml import storage
from distmaml.config import Config, config_from_dict, load_config
from distmaml.data.errors import DataError
from distmaml.errors import DistmamlError
from distmaml.fastpath import malloc
from distmaml.machine import interrupt
from distmaml.run.assembly import with_absolute_uri
from distmaml.run.results import describe
from distmaml.storage import Location
from distmaml.tracking.probe import check_tracking


class UserError(DistmamlError):
    """An error in what the user asked for; printed as one line, no traceback."""


def _config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.set or [])
    if getattr(args, "workers", None) is not None:
        overrides.append(f"workers={args.workers}")
    return with_absolute_uri(load_config(args.config, overrides))


def print_meta_test(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    mt, before = result["meta_test"], result.get("meta_test_unadapted")
    steps = result.get("inner_test_steps")
    print(f"meta-test, {mt['tasks']} held-out tasks, {steps} inner steps: {describe(mt)} (95% interval)", file=out)
    if before:
        print(f"the same tasks without adaptation:            {describe(before)}", file=out)
    reference = result.get("reference")
    if reference:  # the recipe's published figure, both with their 95% intervals
        print(f"reference, {reference['source']}: {describe(reference)}", file=out)


@interrupt.stop_on_signals()  # SIGTERM, SIGINT: checkpoint the last step, one line, exit 143 or 130
def cmd_train(args: argparse.Namespace) -> int:
    from distmaml.run.assembly import assemble

    run_dir: Location | None
    if args.resume:
        from distmaml.run.checkpoint import load_checkpoint

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
            from distmaml.run.checkpoint import foreign_run_file

            if (foreign := foreign_run_file(run_dir)) is not None:  # a run would overwrite it
                raise UserError(
                    f"--out {run_dir}: {foreign} there was not written by distmaml and a run would overwrite it; "
                    "choose another folder"
                )
            storage.check_writable(run_dir, "--out")  # before any engine or worker starts
    # The task family is opened on the driver first: a missing or unfit store is one line, not a
    # worker that died while starting (and a glyphs store is prepared once, here).
    check_tracking(config)
    run = assemble(config, args.address)
    result = run.fit(run_dir, progress=not args.quiet, resume=bool(args.resume))
    print_meta_test(result)
    if run_dir is not None:
        print(f"run written to {run_dir}")
    if "mlflow_run_id" in result:
        print(f"MLflow run {result['mlflow_run_id']} in {config.tracking.uri}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distmaml.run.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, tasks=args.tasks, overrides=args.set or [])
    print_meta_test(result)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from distmaml.recipes.catalog import recipe_rows, render_markdown, render_text

    rows = recipe_rows()
    print(render_markdown(rows) if args.markdown else render_text(rows))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from distmaml.tune import load_space, render_text, run_sweep, with_overrides

    spec = with_overrides(load_space(args.space), num_samples=args.trials, overrides=args.set or [])
    check_tracking(spec.base_config())
    result = run_sweep(spec, address=args.address, storage=args.storage, verbose=0 if args.quiet else 1)
    print(f"\n{len(result.rows)} trials of {spec.name}, best first by {spec.metric} ({spec.mode}):")
    print(render_text(result.rows, spec))
    if result.best is None:
        raise UserError(f"no trial of {spec.name} reported {spec.metric}; see the trial errors above")
    print(f"best checkpoint: {result.best.checkpoint}")
    print(f"  meta-test it:  distmaml evaluate --checkpoint {result.best.checkpoint}")
    if result.parent_run_id:
        # workflowType: MLflow 3's UI opens in its GenAI view otherwise
        page = f"#/experiments/{result.experiment_id}/runs?workflowType=machine_learning"
        uri = str(result.tracking_uri)
        print(f"MLflow parent run {result.parent_run_id} (experiment {spec.name!r}); review it", end="")
        if uri.startswith(("http://", "https://")):  # a tracking server: its own UI (on a cluster, through SSH)
            print(f" at {uri.rstrip('/')}/{page}")
        else:
            print(f" with\n  mlflow ui --backend-store-uri {uri}\n  then open http://127.0.0.1:5000/{page}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from distmaml.tracking.sync import sync_run

    for path in args.run_dir:
        done = sync_run(path, uri=args.uri)
        run = f"MLflow run {done.run_id} in {done.uri}" + (f" ({done.status})" if done.status else "")
        if done.sent:
            print(f"{path}: sent {done.sent} records to {run}")
        else:
            print(f"{path}: nothing to send; all {done.records} records are in {run}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distmaml.bench import main as bench_main

    return bench_main(args)


def _proportions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give train,val,test proportions, e.g. 0.64,0.16,0.2")
    return values  # type: ignore[return-value]


def cmd_prepare(args: argparse.Namespace) -> int:
    """Writes a task store to ``--out``; an object-store URI is written locally first, then uploaded."""
    if not storage.is_uri(args.out):
        return _prepare(args)
    import tempfile

    from distmaml.data.store import METADATA

    uri = str(storage.location(args.out))
    if storage.exists(storage.join(uri, METADATA)) and not args.overwrite:
        raise DataError(f"--out {uri} already holds a task store; pass --overwrite to replace it")
    storage.check_writable(uri, "--out")
    with tempfile.TemporaryDirectory(prefix="distmaml-prepare-") as tmp:
        args.out = str(Path(tmp) / storage.name(uri))
        _prepare(args)
        storage.upload_dir(args.out, uri, last=METADATA)
    print(f"uploaded to {uri}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from distmaml.data.store import describe_store, open_store

    began = time.perf_counter()
    if args.dataset == "omniglot":
        from distmaml.data.omniglot import prepare_omniglot

        prepare_omniglot(
            args.source,
            args.out,
            size=args.size,
            split=args.split,
            train_classes=args.train_classes,
            val_classes=args.val_classes,
            rotations=args.rotations,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    elif args.dataset == "imagefolder":
        from distmaml.data.imagefolder import prepare_imagefolder

        prepare_imagefolder(
            args.source,
            args.out,
            size=args.size,
            split_files=args.split_files,
            proportions=args.proportions,
            seed=args.seed,
            channels=args.channels,
            overwrite=args.overwrite,
        )
    elif args.dataset in ("cifarfs", "fc100"):
        from distmaml.data.cifar import prepare_cifar

        prepare_cifar(args.dataset, args.source, args.out, size=args.size, overwrite=args.overwrite)
    elif args.dataset == "miniimagenet":
        from distmaml.data.minicache import prepare_miniimagenet_cache

        prepare_miniimagenet_cache(args.source, args.out, size=args.size, overwrite=args.overwrite)
    elif args.dataset == "tieredimagenet":
        from distmaml.data.tiered import prepare_tieredimagenet

        prepare_tieredimagenet(
            args.source, args.out, size=args.size, npz_order=args.npz_order, overwrite=args.overwrite
        )
    elif args.dataset == "cub":
        from distmaml.data.cub import prepare_cub

        prepare_cub(args.source, args.out, size=args.size, overwrite=args.overwrite)
    else:
        from distmaml.data.glyphs import GlyphSpec, prepare_glyphs

        spec = GlyphSpec(
            classes=args.classes,
            drawings=args.drawings,
            size=args.size,
            val_classes=args.val_classes,
            test_classes=args.test_classes,
            jitter=args.jitter,
            seed=args.seed,
        )
        prepare_glyphs(args.out, spec, overwrite=args.overwrite)
    info = open_store(args.out)
    print(f"task store written to {info.path} in {time.perf_counter() - began:.1f} s: {describe_store(info)}")
    return 0


def _add_prepare(sub: Any) -> None:
    prepare = sub.add_parser("prepare", help="convert a data set into a Parquet task store")
    kinds = prepare.add_subparsers(dest="dataset", required=True)

    def common(p: argparse.ArgumentParser, size: int, out: str | None = None, seed: bool = True) -> None:
        if out is None:
            p.add_argument("--out", required=True, metavar="DATA_DIR", help="store folder to create")
        else:
            p.add_argument(
                "--out",
                default=out,
                metavar="DATA_DIR",
                help=f"store folder to create (default: {out}, where the recipes read it)",
            )
        p.add_argument("--size", type=int, default=size, help=f"training resolution in pixels (default: {size})")
        if seed:
            p.add_argument("--seed", type=int, default=0, help="seed of the class split (default: 0)")
        p.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
        p.set_defaults(func=cmd_prepare)

    om = kinds.add_parser("omniglot", help="Omniglot's images_background/ and images_evaluation/ folders")
    om.add_argument(
        "--source", required=True, metavar="DIR", help="folder holding images_background/ and images_evaluation/"
    )
    common(om, 28)
    om.add_argument("--split", choices=("paper", "alphabets"), default="paper", help="class split (default: paper)")
    om.add_argument("--train-classes", type=int, default=1100, help="paper split: meta-train characters (1100)")
    om.add_argument("--val-classes", type=int, default=100, help="meta-validation characters (100)")
    om.add_argument(
        "--no-rotations", dest="rotations", action="store_false", help="no 90/180/270-degree rotations as new classes"
    )

    im = kinds.add_parser("imagefolder", help="a class-per-folder image tree, e.g. miniImageNet")
    im.add_argument("--source", required=True, metavar="DIR", help="folder of <class>/*.jpg|png")
    common(im, 84)
    im.add_argument("--split-files", metavar="DIR", help="folder with train.csv, val.csv, test.csv (filename,label)")
    im.add_argument(
        "--proportions",
        type=_proportions,
        default=(0.64, 0.16, 0.2),
        help="train,val,test class shares (no split files)",
    )
    im.add_argument("--channels", type=int, default=3, choices=(1, 3), help="3: RGB (default), 1: grey")

    # The benchmarks whose split is fixed by their papers: no --seed, and --out defaults to the
    # folder the recipes read (data/<kind>), so `distmaml prepare cifarfs --source DIR` is enough.
    benchmarks = {
        "cifarfs": (
            "CIFAR-FS (Bertinetto et al. 2019): 64/16/20 classes of CIFAR-100, 32x32 RGB",
            "cifar-100-python/ folder (train, test, meta) as torchvision.datasets.CIFAR100 downloads it",
            32,
        ),
        "fc100": (
            "FC100 (Oreshkin et al. 2018): 12/4/4 superclasses, 60/20/20 classes of CIFAR-100, 32x32 RGB",
            "cifar-100-python/ folder (train, test, meta) as torchvision.datasets.CIFAR100 downloads it",
            32,
        ),
        "miniimagenet": (
            "miniImageNet from the pickle caches mini-imagenet-cache-{train,val,test}.pkl: 64/16/20 classes, 84x84",
            "folder holding mini-imagenet-cache-{train,val,test}.pkl",
            84,
        ),
        "tieredimagenet": (
            "tieredImageNet (Ren et al. 2018): 351/97/160 classes, 84x84 RGB, streamed",
            "folder holding {train,val,test}_images_png.pkl (or _images.npz) and {split}_labels.pkl",
            84,
        ),
        "cub": (
            "CUB-200-2011 with Chen et al. 2019's 100/50/50 class split, 84x84 RGB",
            "the official CUB_200_2011/ folder (images/, images.txt, image_class_labels.txt, classes.txt)",
            84,
        ),
    }
    for kind, (what, source, size) in benchmarks.items():
        bp = kinds.add_parser(kind, help=what, description=f"{what}. The recipes expect the store at data/{kind}.")
        bp.add_argument("--source", required=True, metavar="DIR", help=source)
        common(bp, size, out=f"data/{kind}", seed=False)
        if kind == "tieredimagenet":
            bp.add_argument(
                "--npz-order",
                choices=("bgr", "rgb"),
                default="bgr",
                help="channel order of {split}_images.npz (default: bgr, as the authors' decompress writes it)",
            )

    gl = kinds.add_parser("glyphs", help="generate the Omniglot-like glyph set (no files needed)")
    common(gl, 28)
    gl.add_argument("--classes", type=int, default=1200, help="characters in all (default: 1200)")
    gl.add_argument("--drawings", type=int, default=20, help="drawings per character (default: 20)")
    gl.add_argument("--val-classes", type=int, default=100, help="meta-validation characters (default: 100)")
    gl.add_argument("--test-classes", type=int, default=200, help="meta-test characters (default: 200)")
    gl.add_argument("--jitter", type=float, default=1.0, help="how unsteady the hand is (default: 1.0)")


ADDRESS_HELP = (
    "Ray address: local, auto (the cluster 'ray start' began on this machine), host:port or ray://host:port "
    "(default: RAY_ADDRESS, else a Ray started here for this command alone)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distmaml", description="Distributed MAML on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train one run")
    train.add_argument("--config", default="sinusoid", help="built-in recipe name or YAML path (default: sinusoid)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key; repeatable")
    train.add_argument("--workers", type=int, help="worker actors (0: compute in this process)")
    train.add_argument("--address", help=ADDRESS_HELP)
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

    rc = sub.add_parser(
        "recipes", help="list the built-in recipes, the store each needs, and the figure it should reach"
    )
    rc.add_argument("--markdown", action="store_true", help="a Markdown table (as docs/recipes.md holds it)")
    rc.set_defaults(func=cmd_recipes)

    tn = sub.add_parser("tune", help="a Ray Tune sweep over a search-space file, tracked in MLflow")
    tn.add_argument("--space", required=True, help="search-space YAML, e.g. tune_spaces/sinusoid.yaml")
    tn.add_argument("--trials", type=int, default=None, help="number of trials (default: the file's num_samples)")
    tn.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed override of the base config; repeatable")
    tn.add_argument("--address", help=ADDRESS_HELP)
    tn.add_argument(
        "--storage",
        default="ray_results",
        help="Tune's storage for trial checkpoints and results: a folder, or s3://... / gs://... on a cluster",
    )
    tn.add_argument("--quiet", action="store_true", help="no Tune progress table")
    tn.set_defaults(func=cmd_tune)

    sy = sub.add_parser("sync", help="send what a run kept while its MLflow server did not answer")
    sy.add_argument("run_dir", nargs="+", metavar="RUN_DIR", help="run directory, or a Tune trial's checkpoint folder")
    sy.add_argument("--uri", help="the MLflow server's address, if not the run's tracking.uri")
    sy.set_defaults(func=cmd_sync)

    bench = sub.add_parser("bench", help="time a meta-step of the core against a per-task baseline")
    bench.add_argument("--configs", default="sinusoid,omniglot", help="comma-separated: sinusoid, omniglot")
    bench.add_argument("--threads", default="1", help="torch threads per measurement, comma-separated")
    bench.add_argument("--steps", type=int, default=0, help="timed meta-steps (0: chosen per config)")
    bench.add_argument("--workers", default="", help="Ray engine worker counts to compare, e.g. 1,2")
    bench.add_argument(
        "--reduce", default="driver", help="with --workers: engines to compare (engine.reduce), e.g. driver,collective"
    )
    bench.add_argument(
        "--reduce-params",
        type=int,
        default=12_000_000,
        help="with --workers: entries of the flat gradient whose reduce alone is timed (0: not timed)",
    )
    bench.add_argument("--engine-steps", type=int, default=0, help="timed steps per worker count (0: --steps)")
    bench.add_argument(
        "--engine-set",
        action="append",
        metavar="KEY=VALUE",
        help="with --workers: a config override of the engine rows, e.g. batching=batched (repeatable)",
    )
    bench.add_argument("--batchings", action="store_true", help="also time the core forced to each batching candidate")
    bench.add_argument(
        "--algorithms", default="", help="instead: peak memory and time per algorithm, e.g. maml,fomaml,anil"
    )
    bench.add_argument("--inner-steps", default="1,5", help="inner steps per --algorithms row, comma-separated")
    bench.add_argument("--recompute", action="store_true", help="--algorithms rows also with inner.recompute=true")
    bench.add_argument("--tasks", type=int, default=0, help="tasks per meta-step in --algorithms rows (0: config's)")
    bench.add_argument(
        "--model", default="", help="--algorithms rows on this network instead (resnet12: generated 84x84 RGB, 5-way)"
    )
    bench.add_argument("--filters", type=int, default=64, help="--model rows: model.filters (64: the papers' widths)")
    bench.add_argument("--image-size", type=int, default=84, help="--model rows: side of the generated images")
    bench.add_argument("--shots", type=int, default=1, help="--model rows: support examples per class")
    bench.add_argument("--queries", type=int, default=1, help="--model rows: query examples per class")
    bench.add_argument(
        "--memory-at", default="5,15", help="--model rows: SHOTS,QUERIES to give memory and time at, by a linear fit"
    )
    bench.add_argument("--json", default="bench.json", help="where to write the JSON results")
    bench.set_defaults(func=cmd_bench)

    _add_prepare(sub)
    return parser


def _command_config(args: argparse.Namespace) -> Config | None:
    """The config a ``train`` (a resumed one: its checkpoint's) or ``tune`` command runs, else None.

    None too for a command line that does not load: the command itself reports it, in its own words.
    """
    overrides = list(getattr(args, "set", None) or [])
    try:
        if args.command == "train" and args.resume:
            from distmaml.run.checkpoint import load_checkpoint

            return config_from_dict(load_checkpoint(args.resume).config)
        if args.command == "train":
            return load_config(
                args.config, overrides + ([f"workers={args.workers}"] if args.workers is not None else [])
            )
        if args.command == "tune":
            from distmaml.tune import load_space, with_overrides

            return with_overrides(load_space(args.space), overrides=overrides).base_config()
    except (Exception, SystemExit):
        return None
    return None


def _on_the_cluster(args: argparse.Namespace) -> None:
    """As a driver on a Ray cluster's head (``ray submit``'s cluster/submit.py, or a Ray job): join the
    cluster with the user's code, pass its address on, and track to the head's MLflow server
    (``distmaml.oncluster``)."""
    from distmaml import oncluster

    config = _command_config(args)
    address = oncluster.cluster_address(getattr(args, "address", None))
    oncluster.join(address, config)
    if hasattr(args, "address"):
        args.address = address  # the engines and the sweep join the same cluster
    overrides = list(args.set or [])
    if args.command in ("train", "tune") and not getattr(args, "resume", None):
        if oncluster.tracks_to_default(config, overrides) and (uri := oncluster.head_tracking_uri()):
            args.set = [*overrides, f"tracking.uri={uri}"]


def main(argv: list[str] | None = None, *, on_cluster: bool = False) -> int:
    """Runs a ``distmaml`` command line; ``on_cluster``: as ``cluster/submit.py`` runs it on the head.

    Inside a Ray job (``ray job submit -- distmaml ...``) ``train``, ``tune`` and ``evaluate`` are
    prepared the same way as with ``on_cluster``.
    """
    from distmaml.cluster.connect import job_runtime_env
    from distmaml.oncluster import COMMANDS

    args = build_parser().parse_args(argv)
    malloc.claim()  # the distmaml command's own process (fastpath.malloc)
    try:
        if args.command in COMMANDS and (on_cluster or job_runtime_env() is not None):
            _on_the_cluster(args)
        return int(args.func(args))
    except DistmamlError as e:  # the project's own input errors; anything else keeps its traceback
        print(f"distmaml: error: {e}", file=sys.stderr)
        return e.exit_code
    except interrupt.Interrupted as stop:
        if stop.step is None and getattr(args, "resume", None):
            stop.run_dir = args.resume  # stopped while starting: its checkpoints are as they were
        print(interrupt.message(stop), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("distmaml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
