"""``distmaml prepare cifarfs`` and ``fc100``: two few-shot splits of CIFAR-100.

Both read the ``cifar-100-python/`` folder that
``torchvision.datasets.CIFAR100(root, download=True)`` unpacks (Krizhevsky's
python version): ``train`` (50,000 images), ``test`` (10,000) and ``meta``,
Python 2 pickles. ``data`` is uint8 ``[N, 3072]``, each row the red, green
and blue 32x32 planes, which is the store's CHW order as it is;
``fine_labels`` index ``meta['fine_label_names']`` (100 classes),
``coarse_labels`` index ``meta['coarse_label_names']`` (20 superclasses of 5
classes). Every class has 500 training and 100 test images; the few-shot
splits pool them, 600 images per class.

* CIFAR-FS (Bertinetto et al., ICLR 2019, "Meta-learning with differentiable
  closed-form solvers"): 64/16/20 classes drawn at random, listed below as in
  the authors' split files (``cifar100/splits/bertinetto/{train,val,test}.txt``
  of their release; Torchmeta ships the same lists).
* FC100 (Oreshkin et al., NeurIPS 2018, "TADAM", supplementary material):
  split by superclass so that meta-train and meta-test share no superclass,
  12/4/4 superclasses, 60/20/20 classes (the same lists in Torchmeta's
  ``fc100`` assets and in the FC100 pickles that MetaOptNet and learn2learn
  download).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distmaml.data.errors import DataError
from distmaml.data.pickles import load_pickle
from distmaml.data.prepare import check_size, check_source, resize, staged_output
from distmaml.data.store import ClassImages, StoreWriter

PARTS = ("train", "test")
SIDE = 32

# CIFAR-FS: Bertinetto et al. (2019), the classes of each split, as fine label names of CIFAR-100.
CIFARFS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl",
        "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch",
        "bee", "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ),
}  # fmt: skip

# FC100: Oreshkin et al. (2018), the superclasses of each split, as coarse label names of CIFAR-100.
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
        "trees", "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip

PAPER_CLASSES = {"cifarfs": (64, 16, 20), "fc100": (60, 20, 20)}


@dataclass(frozen=True)
class Cifar100:
    """CIFAR-100's train and test parts pooled: images uint8 ``[N, 3, 32, 32]`` and their labels."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    files: list[str]
    fine_names: list[str]
    coarse_names: list[str]

    def rows_of(self, fine_index: int) -> np.ndarray:
        return np.flatnonzero(self.fine == fine_index)


def _names(meta: Any, key: str, count: int, path: Path) -> list[str]:
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: '{key}' should list {count} names; this is not CIFAR-100's meta file")
    return names


def read_cifar100(folder: Path) -> Cifar100:
    """Reads and checks ``train``, ``test`` and ``meta`` of a ``cifar-100-python/`` folder."""
    hint = "expected cifar-100-python/ with train, test and meta, as torchvision.datasets.CIFAR100 downloads it"
    if not (folder / "meta").is_file() and (folder / "cifar-100-python").is_dir():
        folder = folder / "cifar-100-python"  # pointed at torchvision's root
    meta = load_pickle(folder / "meta", hint)
    fine_names = _names(meta, "fine_label_names", 100, folder / "meta")
    coarse_names = _names(meta, "coarse_label_names", 20, folder / "meta")
    images, fine, coarse, files = [], [], [], []
    for part in PARTS:
        path = folder / part
        entry = load_pickle(path, hint)
        missing = [k for k in ("data", "fine_labels", "coarse_labels") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DataError(f"{path}: no {', '.join(repr(k) for k in missing)} in it; this is not a CIFAR-100 pickle")
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' should be uint8 [N, 3072] (32x32 RGB), found {got}")
        f = np.asarray(entry["fine_labels"], dtype=np.int64)
        c = np.asarray(entry["coarse_labels"], dtype=np.int64)
        if len(f) != len(data) or len(c) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(f)} fine and {len(c)} coarse labels")
        if len(f) and (f.min() < 0 or f.max() >= 100 or c.min() < 0 or c.max() >= 20):
            raise DataError(f"{path}: labels out of range (fine 0..99, coarse 0..19)")
        names = entry.get("filenames")
        names = names if isinstance(names, list) and len(names) == len(data) else [""] * len(data)
        images.append(data.reshape(-1, 3, SIDE, SIDE))
        fine.append(f)
        coarse.append(c)
        files += [f"{part}[{i}] {n}".rstrip() for i, n in enumerate(names)]
    return Cifar100(
        np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), files, fine_names, coarse_names
    )


def split_classes(data: Cifar100, kind: str) -> dict[str, list[int]]:
    """The fine label indices of each split of ``kind`` (``cifarfs`` or ``fc100``)."""
    if kind == "cifarfs":
        index = {name: i for i, name in enumerate(data.fine_names)}
        unknown = sorted({n for names in CIFARFS_CLASSES.values() for n in names} - set(index))
        if unknown:
            raise DataError(f"CIFAR-100's meta names no class {', '.join(unknown)}; is it CIFAR-100's meta file?")
        return {split: [index[n] for n in names] for split, names in CIFARFS_CLASSES.items()}
    if kind == "fc100":
        index = {name: i for i, name in enumerate(data.coarse_names)}
        unknown = sorted({n for names in FC100_SUPERCLASSES.values() for n in names} - set(index))
        if unknown:
            raise DataError(f"CIFAR-100's meta names no superclass {', '.join(unknown)}; is it CIFAR-100's meta file?")
        superclass_of = _superclass_of(data)
        return {
            split: [f for f in range(100) if superclass_of.get(f) in {index[n] for n in names}]
            for split, names in FC100_SUPERCLASSES.items()
        }
    raise ValueError(f"kind {kind!r}: cifarfs or fc100")


def _superclass_of(data: Cifar100) -> dict[int, int]:
    """Each fine class's superclass, from the images' labels; a class with two is refused."""
    pairs = np.unique(np.stack([data.fine, data.coarse], 1), axis=0)
    out: dict[int, int] = {}
    for f, c in pairs.tolist():
        if out.setdefault(f, c) != c:
            raise DataError(f"CIFAR-100 class {data.fine_names[f]!r} is labelled with two superclasses; damaged labels")
    return out


def _classes(data: Cifar100, members: list[int], size: int) -> Iterator[ClassImages]:
    for f in members:
        rows = data.rows_of(f)
        if len(rows) == 0:
            raise DataError(f"CIFAR-100 class {data.fine_names[f]!r} has no images in train or test")
        images = resize(torch.from_numpy(data.images[rows]), size)
        group = data.coarse_names[int(data.coarse[rows[0]])]
        yield ClassImages(data.fine_names[f], group, images, [data.files[r] for r in rows])


def prepare_cifar(
    kind: str, source: str | Path, out: str | Path, *, size: int = SIDE, overwrite: bool = False
) -> dict[str, Any]:
    """Writes CIFAR-FS (``kind="cifarfs"``) or FC100 (``"fc100"``) as a task store at ``out``.

    Example:
        >>> prepare_cifar("cifarfs", "~/data/cifar-100-python", "data/cifarfs")
    """
    src = check_source(source)
    check_size(size)
    began = time.perf_counter()
    data = read_cifar100(src)
    splits = split_classes(data, kind)
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (3, size, size))
        for split, members in splits.items():
            writer.write_split(split, _classes(data, members, size))
        source_info = {"kind": kind, "path": str(src.resolve()), "size": size}
        meta = writer.finish({**source_info, "seconds": round(time.perf_counter() - began, 2)})
    return meta
