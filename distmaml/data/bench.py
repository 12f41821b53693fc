"""Speed of the data layer: store load time and episode sampling rate.

``sampler_tasks_per_second`` builds (once, into a folder it is given or a
temporary one) an Omniglot-sized store of synthetic images: 1623 classes of
20 images, 1100 meta-train classes with their three rotations as in
``prepare omniglot`` (4400 classes, 88,000 images), and times loading the
meta-train split and sampling Omniglot-shaped episodes on one thread.
``distmaml bench`` prints it beside the rate at which a worker consumes tasks.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distmaml.data.store import ClassImages, StoreWriter, is_store

OMNIGLOT_CLASSES = 1623
OMNIGLOT_TRAIN, OMNIGLOT_VAL = 1100, 100


def write_synthetic_store(
    out: Path,
    *,
    classes: int = OMNIGLOT_CLASSES,
    train_classes: int = OMNIGLOT_TRAIN,
    val_classes: int = OMNIGLOT_VAL,
    images: int = 20,
    size: int = 28,
    rotations: bool = True,
    seed: int = 0,
) -> Path:
    """A store shaped like prepared Omniglot, with random binary-ish images (no decoding involved)."""
    from distmaml.data.prepare import staged_output

    g = torch.Generator().manual_seed(seed)
    bounds = {
        "train": (0, train_classes),
        "val": (train_classes, train_classes + val_classes),
        "test": (train_classes + val_classes, classes),
    }
    with staged_output(out, overwrite=True) as tmp:
        writer = StoreWriter(tmp, (1, size, size))
        for split, (lo, hi) in bounds.items():
            items = []
            for c in range(lo, hi):
                ink = torch.rand(images, 1, size, size, generator=g) < 0.15
                pixels = torch.where(ink, 0, 255).to(torch.uint8)
                items.append(ClassImages(f"class{c:05d}", "synthetic", pixels, []))
                if rotations and split == "train":
                    for angle in (90, 180, 270):
                        turned = torch.rot90(pixels, angle // 90, (2, 3)).contiguous()
                        items.append(ClassImages(f"class{c:05d}/rot{angle:03d}", "synthetic", turned, [], angle))
            writer.write_split(split, items)
        writer.finish({"kind": "synthetic", "classes": classes, "images": images, "size": size})
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
            tasks = ImageTasks(path, ways=ways, shots=shots, queries=queries, seed=0)
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


if __name__ == "__main__":
    import json

    print(json.dumps(sampler_tasks_per_second(), indent=1))
