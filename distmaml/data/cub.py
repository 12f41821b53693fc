"""``distmaml prepare cub``: CUB-200-2011 with Chen et al.'s few-shot class split.

The official ``CUB_200_2011/`` folder (Wah et al., 2011) holds
``images/<NNN.Class_Name>/*.jpg`` and three index files, one entry per line,
space-separated, ids from 1:

* ``classes.txt``: ``<class_id> <class folder name>`` (200 classes);
* ``images.txt``: ``<image_id> <path under images/>`` (11,788 images);
* ``image_class_labels.txt``: ``<image_id> <class_id>``.

The split is that of Chen et al. (ICLR 2019, "A Closer Look at Few-shot
Classification", ``filelists/CUB/write_CUB_filelist.py``): the class folders
in sorted order, numbered from 0; class i is meta-train (their "base") when
i is even, meta-validation when i % 4 == 1, meta-test ("novel") when
i % 4 == 3, which gives 100/50/50 classes. The folders sort as the class ids
do (``001.`` ... ``200.``), so i is ``class_id - 1``. Images are decoded as
RGB (a few of CUB's are grey) and resized to ``size`` x ``size`` (84 by
default, the conv4 papers' input).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distmaml.data.errors import DataError
from distmaml.data.prepare import check_size, check_source, load_class, staged_output
from distmaml.data.store import ClassImages, StoreWriter

PAPER_CLASSES = (100, 50, 50)
FOLDER = "CUB_200_2011"
INDEX_FILES = ("classes.txt", "images.txt", "image_class_labels.txt")


def chen_split(position: int) -> str:
    """The split of the class at ``position`` (0-based, sorted order) in Chen et al. (2019)."""
    if position % 2 == 0:
        return "train"
    return "val" if position % 4 == 1 else "test"


def _read_index(path: Path) -> list[tuple[str, str]]:
    """``<id> <value>`` lines as (id, value) pairs; a malformed line is named."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; expected the official CUB_200_2011/ folder "
            f"({', '.join(INDEX_FILES)} beside images/)"
        )
    pairs = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path} line {number}: expected '<id> <value>', found {line[:80]!r}; is it CUB's file?")
        pairs.append((parts[0], parts[1].strip()))
    if not pairs:
        raise DataError(f"{path}: the file is empty")
    return pairs


def read_cub(folder: Path) -> dict[str, list[Path]]:
    """Class folder name -> its image files, in the sorted order of the classes; every file checked."""
    class_names = dict(_read_index(folder / "classes.txt"))
    images = dict(_read_index(folder / "images.txt"))
    labels = _read_index(folder / "image_class_labels.txt")
    by_class: dict[str, list[Path]] = {name: [] for name in class_names.values()}
    for image_id, class_id in labels:
        if image_id not in images:
            raise DataError(f"{folder / 'image_class_labels.txt'}: image {image_id} is not in images.txt")
        if class_id not in class_names:
            raise DataError(f"{folder / 'image_class_labels.txt'}: class {class_id} is not in classes.txt")
        path = folder / "images" / images[image_id]
        if not path.is_file():
            raise DataError(f"{folder / 'images.txt'}: image {image_id} is {path}, which does not exist")
        by_class[class_names[class_id]].append(path)
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise DataError(f"{folder / 'image_class_labels.txt'}: class {empty[0]!r} has no images")
    return {name: sorted(by_class[name]) for name in sorted(by_class)}


def _classes(folder: Path, classes: dict[str, list[Path]], size: int) -> Iterator[ClassImages]:
    for name, files in classes.items():
        yield ClassImages(name, name, load_class(files, 3, size), [str(f.relative_to(folder)) for f in files])


def prepare_cub(source: str | Path, out: str | Path, *, size: int = 84, overwrite: bool = False) -> dict[str, Any]:
    """Writes CUB-200-2011 with Chen et al.'s split as a task store at ``out``.

    Example:
        >>> prepare_cub("~/data/CUB_200_2011", "data/cub")
    """
    src = check_source(source)
    if not (src / "images.txt").is_file() and (src / FOLDER).is_dir():
        src = src / FOLDER  # pointed at the folder the archive unpacks into
    check_size(size)
    began = time.perf_counter()
    classes = read_cub(src)
    splits: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
    for position, (name, files) in enumerate(classes.items()):
        splits[chen_split(position)][name] = files
    if not all(splits.values()):
        raise DataError(f"{src / 'classes.txt'}: {len(classes)} classes leave a split empty; CUB has 200")
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (3, size, size))
        for split, members in splits.items():
            writer.write_split(split, _classes(src, members, size))
        meta = writer.finish(
            {"kind": "cub", "path": str(src.resolve()), "size": size, "split": "chen2019",
             "seconds": round(time.perf_counter() - began, 2)}
        )  # fmt: skip
    return meta
