"""``distmaml prepare miniimagenet``: the miniImageNet pickle caches to a task store.

The caches ``mini-imagenet-cache-{train,val,test}.pkl`` come from Ren et
al.'s few-shot-ssl-public (``fewshot/data/mini_imagenet.py``, written by
Python 2 with ``pickle.HIGHEST_PROTOCOL``) and are what learn2learn's
``MiniImagenet`` downloads. Each is a dict:

* ``image_data``: uint8 ``[N, 84, 84, 3]`` (HWC, RGB), the images of the
  split, resized to 84x84 from ImageNet, in the order of the split's CSV;
* ``class_dict``: class (a WordNet id such as ``n01532829``) -> the list of
  its row indices in ``image_data``.

learn2learn saves the validation cache as ``mini-imagenet-cache-validation.pkl``;
either name is read.

The split is the files': Ravi & Larochelle's 64/16/20 classes of 600 images.
A pickle cannot be read in pieces, so a split's array is in memory while it
is written (0.8 GB for train); classes are written one at a time from it.
The ``imagefolder`` kind reads the same data set from its JPEGs and CSVs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distmaml.data.errors import DataError
from distmaml.data.pickles import load_pickle
from distmaml.data.prepare import check_size, check_source, resize, staged_output
from distmaml.data.store import ClassImages, StoreWriter
from distmaml.tasks.base import SPLITS

PAPER_CLASSES = (64, 16, 20)


def cache_file(source: Path, split: str) -> Path:
    """The split's cache; learn2learn names the validation one ``-validation.pkl`` (its mode's name)."""
    path = source / f"mini-imagenet-cache-{split}.pkl"
    alias = source / "mini-imagenet-cache-validation.pkl"
    return alias if split == "val" and not path.is_file() and alias.is_file() else path


def read_cache(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """(image_data, class_dict) of one cache file, checked."""
    data = load_pickle(path, "expected mini-imagenet-cache-{train,val,test}.pkl in --source")
    if isinstance(data, dict):  # written by Python 2 and read as bytes by some tools: either key kind
        data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict', found {found}")
    images, classes = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: 'image_data' should be uint8 [N, 84, 84, 3], found {got}")
    if not isinstance(classes, dict) or not classes:
        raise DataError(
            f"{path}: 'class_dict' should map each class to its row indices, found {type(classes).__name__}"
        )
    out: dict[str, list[int]] = {}
    for name, rows in classes.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            idx = [int(r) for r in rows]
        except (TypeError, ValueError):
            raise DataError(f"{path}: class_dict[{name!r}] is not a list of row indices") from None
        if not idx or min(idx) < 0 or max(idx) >= len(images):
            raise DataError(
                f"{path}: class_dict[{name!r}] names rows outside image_data's {len(images)} (or none); damaged file"
            )
        out[name] = idx
    return images, out


def _classes(images: np.ndarray, classes: dict[str, list[int]], size: int, file: str) -> Iterator[ClassImages]:
    for name, rows in classes.items():
        chw = torch.from_numpy(np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2)))
        yield ClassImages(name, name, resize(chw, size), [f"{file}[{r}]" for r in rows])


def prepare_miniimagenet_cache(
    source: str | Path, out: str | Path, *, size: int = 84, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the three miniImageNet caches of ``source`` as a task store at ``out``.

    Example:
        >>> prepare_miniimagenet_cache("~/data/mini-imagenet", "data/miniimagenet")
    """
    src = check_source(source)
    check_size(size)
    began = time.perf_counter()
    missing = [cache_file(src, s).name for s in SPLITS if not cache_file(src, s).is_file()]
    if missing:
        raise DataError(
            f"--source {src}: {', '.join(missing)} missing; expected mini-imagenet-cache-train.pkl, -val.pkl and "
            "-test.pkl (for a folder of JPEGs with split CSVs use `distmaml prepare imagefolder`)"
        )
    seen: dict[str, str] = {}
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (3, size, size))
        for split in SPLITS:
            path = cache_file(src, split)
            images, classes = read_cache(path)
            for name in classes:
                if seen.setdefault(name, split) != split:
                    raise DataError(f"{path}: class {name!r} is also in the {seen[name]} cache; splits must not share")
            writer.write_split(split, _classes(images, classes, size, path.name))
            del images
        meta = writer.finish(
            {"kind": "miniimagenet", "path": str(src.resolve()), "size": size,
             "seconds": round(time.perf_counter() - began, 2)}
        )  # fmt: skip
    return meta
