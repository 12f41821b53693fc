"""Speed and memory of the data layer: store load time, episode sampling rate, memory per node.

``sampler_tasks_per_second`` builds (once, into a folder it is given or a
temporary one) an Omniglot-sized store of synthetic images: 1623 classes of
20 images, 1100 meta-train classes with their three rotations as in
``prepare omniglot`` (4400 classes, 88,000 images), and times loading the
meta-train split and sampling Omniglot-shaped episodes on one thread.
``distmaml bench`` prints it beside the rate at which a worker consumes tasks.

``split_memory`` measures what a split costs a node: W worker processes
start together, each samples from the meta-train split of a store of
miniImageNet's train size (38,400 RGB images of 84x84, 0.8 GB decoded) and
touches every image, and each reports its proportional set size (PSS: a page
shared by k processes counts 1/k in each) before and after, from
``/proc/<pid>/smaps_rollup``. The split's share of a worker is the growth of
its anonymous PSS (memory no file backs: a private copy) plus its PSS of the
cache file; the rest of its PSS moves with the other processes on the node
that map the same libraries (torch's pages cost a worker more once others
exit), so it is left out. Shared through the node's cache file, the W
workers hold one copy in total; read privately, W copies::

    python -m distmaml.bench.data memory              # both modes, 2 workers, miniImageNet's size
    python -m distmaml.bench.data memory --workers 4 --store DATA_DIR

The generated store takes about 1 GB in the temporary folder, 2 GB of
memory while it is written, and each private copy 0.8 GB per worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distmaml.data.store import ClassImages, StoreWriter, is_store

OMNIGLOT_CLASSES = 1623
OMNIGLOT_TRAIN, OMNIGLOT_VAL = 1100, 100
MINIIMAGENET_TRAIN, MINIIMAGENET_IMAGES = 64, 600


def write_synthetic_store(
    out: Path,
    *,
    classes: int = OMNIGLOT_CLASSES,
    train_classes: int = OMNIGLOT_TRAIN,
    val_classes: int = OMNIGLOT_VAL,
    images: int = 20,
    size: int = 28,
    rotations: bool = True,
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """A store shaped like prepared Omniglot, with random binary-ish images (no decoding involved).

    ``channels`` > 1: uniformly random pixels (RGB stores such as miniImageNet's).
    """
    from distmaml.data.prepare import staged_output

    g = torch.Generator().manual_seed(seed)
    bounds = {
        "train": (0, train_classes),
        "val": (train_classes, train_classes + val_classes),
        "test": (train_classes + val_classes, classes),
    }
    with staged_output(out, overwrite=True) as tmp:
        writer = StoreWriter(tmp, (channels, size, size))
        for split, (lo, hi) in bounds.items():
            items = []
            for c in range(lo, hi):
                if channels == 1:
                    ink = torch.rand(images, 1, size, size, generator=g) < 0.15
                    pixels = torch.where(ink, 0, 255).to(torch.uint8)
                else:
                    pixels = torch.randint(0, 256, (images, channels, size, size), generator=g, dtype=torch.uint8)
                items.append(ClassImages(f"class{c:05d}", "synthetic", pixels, []))
                if rotations and split == "train":
                    for angle in (90, 180, 270):
                        turned = torch.rot90(pixels, angle // 90, (2, 3)).contiguous()
                        items.append(ClassImages(f"class{c:05d}/rot{angle:03d}", "synthetic", turned, [], angle))
            writer.write_split(split, items)
        writer.finish({"kind": "synthetic", "classes": classes, "images": images, "size": size, "channels": channels})
    return out


def sampler_tasks_per_second(
    store: str | Path | None = None,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    tasks_per_batch: int = 32,
    seconds: float = 2.0,
    threads: int = 1,
) -> dict[str, Any]:
    """Times the store's load and the sampler; returns a dict for the benchmark table.

    Args:
        store: an existing store folder; None writes the Omniglot-sized
            synthetic store into a temporary folder (a few seconds).
        tasks_per_batch: tasks per ``sample`` call (a meta-batch, as a worker asks).
        seconds: how long to sample for.
        threads: torch threads during the measurement (restored after).

    Returns:
        ``{"tasks_per_second", "load_seconds", "store_mb", "train_classes", "train_images",
        "ways", "shots", "queries", "threads"}``.

    Example:
        >>> sampler_tasks_per_second()["tasks_per_second"]  # Omniglot-shaped 5-way 1-shot, 15 queries
    """
    from distmaml.data.episodes import ImageTasks

    with tempfile.TemporaryDirectory(prefix="distmaml-bench-") as tmp:
        path = Path(store) if store is not None else write_synthetic_store(Path(tmp) / "store")
        if not is_store(path):
            raise FileNotFoundError(f"no task store at {path}")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            # a private copy: the sampler is what is timed, and a temporary store must leave no cache file
            tasks = ImageTasks(path, ways=ways, shots=shots, queries=queries, seed=0, shared=False)
            began = time.perf_counter()
            train = tasks.split("train")
            load = time.perf_counter() - began
            tasks.sample("train", 0, range(tasks_per_batch))  # warm-up
            n, step, began = 0, 1, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds or n == 0:
                tasks.sample("train", step, range(tasks_per_batch))
                n += tasks_per_batch
                step += 1
        finally:
            torch.set_num_threads(previous)
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        return {
            "tasks_per_second": n / elapsed,
            "load_seconds": load,
            "store_mb": size_mb,
            "train_classes": len(train.classes),
            "train_images": int(train.images.shape[0]),
            "ways": ways,
            "shots": shots,
            "queries": queries,
            "threads": threads,
        }


def write_miniimagenet_sized_store(
    out: Path, *, train_classes: int = MINIIMAGENET_TRAIN, images: int = MINIIMAGENET_IMAGES, size: int = 84
) -> Path:
    """A store with miniImageNet's meta-train split (64 classes x 600 RGB 84x84 images) and 5-class val/test."""
    return write_synthetic_store(
        out,
        classes=train_classes + 10,
        train_classes=train_classes,
        val_classes=5,
        images=images,
        size=size,
        rotations=False,
        channels=3,
    )


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as bytes per field (``Rss``, ``Pss``, ``Shared_Clean``, ...); Linux only."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def mapped_memory(folder: str | Path, pid: int | str = "self") -> dict[str, int]:
    """``Rss`` and ``Pss`` in bytes of the process's mappings of files under ``folder``, from ``/proc/<pid>/smaps``."""
    prefix = str(Path(folder).resolve())
    total = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
            inside = len(head) == 6 and head[5].startswith(prefix)
        elif inside and head and head[0] in ("Rss:", "Pss:"):
            total[head[0][:-1]] += int(head[1]) * 1024
    return total


def _memory_worker(store: str, cache: str, shared: bool, barrier: Any, out: Any) -> None:
    """One worker: everything imported, then the train split loaded and every image touched."""
    os.environ["DISTMAML_CACHE"] = cache
    torch.set_num_threads(1)
    from distmaml.data.episodes import ImageTasks

    warm = ImageTasks(store, ways=5, shots=1, queries=15, shared=False)
    # warm-up, alike in every worker: the Parquet reader's code and pools, and the sampler, before the baseline
    int(warm.split("val").images.sum())
    warm.sample("val", 0, range(2))
    del warm
    tasks = ImageTasks(store, ways=5, shots=1, queries=15, shared=shared)
    barrier.wait()  # all started: libraries shared alike in both readings
    before = smaps_rollup()
    barrier.wait()
    images = tasks.split("train").images
    checksum = int(images.sum())  # reads every page, as a long run's random episodes do
    barrier.wait()  # all loaded
    after = smaps_rollup()
    mapped = mapped_memory(cache)
    out.put({"before": before, "after": after, "mapped": mapped, "checksum": checksum, "bytes": images.numel()})
    barrier.wait()  # stay mapped until every worker has measured


def split_memory(store: str | Path, *, workers: int = 2, shared: bool = True, timeout: float = 600) -> dict[str, Any]:
    """The meta-train split's memory on one node with ``workers`` worker processes.

    Each worker is a fresh ``spawn`` process (as a Ray actor is) with its own
    cache folder for the run, a temporary one, so the first worker writes the
    cache file while the others wait, as on a node of a new run.

    Returns:
        ``{"shared", "workers", "split_mb", "pss_mb", "rss_mb", "mapped_pss_mb",
        "mapped_rss_mb", "split_pss_mb", "copies"}``: the growth of each
        worker's PSS and RSS in MiB, each worker's PSS and RSS of the cache
        files it maps (0 when private), each worker's share of the split (its
        anonymous PSS growth plus its PSS of the cache files), and the sum of
        those shares in units of the split's size (about 1 when shared,
        ``workers`` when each reads its own).
    """
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(workers, timeout=timeout), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distmaml-splitcache-") as cache:
        procs = [
            ctx.Process(target=_memory_worker, args=(str(store), cache, shared, barrier, out)) for _ in range(workers)
        ]
        for p in procs:
            p.start()
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while len(rows) < workers:
                try:
                    rows.append(out.get(timeout=1))
                except queue.Empty:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        raise RuntimeError(f"memory workers failed (exit codes {failed}) or timed out") from None
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    if len({r["checksum"] for r in rows}) != 1:
        raise AssertionError(f"workers read different pixels: {[r['checksum'] for r in rows]}")
    mb = 2**20
    split = rows[0]["bytes"]
    pss = [(r["after"]["Pss"] - r["before"]["Pss"]) for r in rows]
    rss = [(r["after"]["Rss"] - r["before"]["Rss"]) for r in rows]
    anon = "Pss_Anon" if all("Pss_Anon" in r["after"] for r in rows) else "Pss"  # Pss_Anon: Linux 5.8 on
    own = [r["after"][anon] - r["before"][anon] + (r["mapped"]["Pss"] if anon == "Pss_Anon" else 0) for r in rows]
    return {
        "shared": shared,
        "workers": workers,
        "split_mb": split / mb,
        "pss_mb": [v / mb for v in pss],
        "rss_mb": [v / mb for v in rss],
        "mapped_pss_mb": [r["mapped"]["Pss"] / mb for r in rows],
        "mapped_rss_mb": [r["mapped"]["Rss"] / mb for r in rows],
        "split_pss_mb": [v / mb for v in own],
        "copies": sum(own) / split,
    }


def _memory_main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m distmaml.bench.data memory",
        description="PSS and RSS growth of W worker processes that each read a store's meta-train split.",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", help="an existing store (default: a generated one of miniImageNet's train size)")
    parser.add_argument("--mode", choices=["both", "shared", "private"], default="both")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give 1 or more worker processes")
    modes = {"both": [False, True], "shared": [True], "private": [False]}[args.mode]
    with tempfile.TemporaryDirectory(prefix="distmaml-bench-") as tmp:
        store = Path(args.store) if args.store else write_miniimagenet_sized_store(Path(tmp) / "store")
        print(
            f"train split of {store}: {args.workers} worker processes; per worker: the split's share, PSS and RSS growth"
        )
        for shared in modes:
            r = split_memory(store, workers=args.workers, shared=shared)
            how = "one file per node" if shared else "private copies   "
            held = " + ".join(f"{v:.0f}" for v in r["split_pss_mb"])
            pss = ", ".join(f"{v:.0f}" for v in r["pss_mb"])
            rss = ", ".join(f"{v:.0f}" for v in r["rss_mb"])
            print(
                f"{how}  split {r['split_mb']:.0f} MiB  held {held} = {sum(r['split_pss_mb']):.0f} MiB "
                f"({r['copies']:.2f} copies)  PSS {pss} MiB  RSS {rss} MiB"
            )


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["memory"]:
        _memory_main(sys.argv[2:])
    else:
        print(json.dumps(sampler_tasks_per_second(), indent=1))
