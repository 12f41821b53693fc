"""``distmaml prepare imagefolder``: any class-per-folder tree to a task store.

The classes are the sub-folders of ``--source`` (``<class>/*.jpg|png``),
decoded as RGB and resized to ``size`` x ``size`` (84 by default, as
miniImageNet). The class split comes from either

* split files in the miniImageNet format of Ravi & Larochelle (2017): a
  folder holding ``train.csv``, ``val.csv`` and ``test.csv``, each a header
  ``filename,label`` then one image per line. An image is looked up at
  ``<source>/<label>/<filename>``, then ``<source>/images/<filename>`` (the
  layout of the original miniImageNet download), then ``<source>/<filename>``;
* or class proportions (default 0.64, 0.16, 0.20: miniImageNet's 64/16/20
  classes of 100) over the sorted class folders shuffled with ``seed``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

from distmaml.data.errors import DataError
from distmaml.data.prepare import check_size, check_source, image_files, load_class, staged_output
from distmaml.data.store import ClassImages, StoreWriter
from distmaml.tasks.base import SPLITS

Classes = dict[str, list[Path]]


def scan_tree(source: Path) -> Classes:
    """Class folder name -> its image files, for every sub-folder holding images."""
    classes = {d.name: image_files(d) for d in sorted(p for p in source.iterdir() if p.is_dir())}
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise DataError(f"--source {source}: no class folders with images; expected <class>/*.jpg or *.png inside it")
    return classes


def _locate(source: Path, label: str, filename: str) -> Path | None:
    for candidate in (source / label / filename, source / "images" / filename, source / filename):
        if candidate.is_file():
            return candidate
    return None


def read_split_files(source: Path, folder: Path) -> dict[str, Classes]:
    """Reads ``train.csv``, ``val.csv``, ``test.csv`` of ``folder``; each split's class -> files."""
    if not folder.is_dir():
        raise DataError(f"--split-files {folder}: no such folder (it should hold train.csv, val.csv, test.csv)")
    out: dict[str, Classes] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if not path.is_file():
            raise DataError(
                f"--split-files {folder}: {split}.csv is missing (train.csv, val.csv and test.csv are needed)"
            )
        classes: Classes = {}
        with path.open(newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header] != ["filename", "label"]:
                raise DataError(f"{path}: the first line must be the header 'filename,label', found {header}")
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                if len(row) != 2:
                    raise DataError(f"{path} line {line}: expected 'filename,label', found {','.join(row)!r}")
                filename, label = row[0].strip(), row[1].strip()
                found = _locate(source, label, filename)
                if found is None:
                    raise DataError(
                        f"{path} line {line} names image {filename!r} of class {label!r}, found neither at "
                        f"{source / label / filename} nor in {source / 'images'} or {source}"
                    )
                if owner.setdefault(label, split) != split:
                    raise DataError(
                        f"{path} line {line}: class {label!r} is also in {owner[label]}.csv; splits must not share classes"
                    )
                classes.setdefault(label, []).append(found)
        if not classes:
            raise DataError(f"{path}: names no images; every split needs classes")
        out[split] = classes
    return out


def split_by_proportions(classes: Classes, proportions: tuple[float, float, float], seed: int) -> dict[str, Classes]:
    """Shuffles the classes with ``seed`` and cuts them by ``proportions`` (train, val, test)."""
    if len(proportions) != 3 or min(proportions) <= 0:
        raise DataError(
            f"--proportions {proportions}: give three positive numbers for train, val, test, e.g. 0.64,0.16,0.2"
        )
    total = sum(proportions)
    names = sorted(classes)
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()]
    n_train = round(len(names) * proportions[0] / total)
    n_val = round(len(names) * proportions[1] / total)
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    for split, members in cuts.items():
        if not members:
            raise DataError(
                f"--proportions {','.join(str(p) for p in proportions)} leaves split {split!r} without classes "
                f"(the source has {len(names)} classes); change the proportions or add classes"
            )
    return {split: {name: classes[name] for name in members} for split, members in cuts.items()}


def prepare_imagefolder(
    source: str | Path,
    out: str | Path,
    *,
    size: int = 84,
    split_files: str | Path | None = None,
    proportions: tuple[float, float, float] = (0.64, 0.16, 0.20),
    seed: int = 0,
    channels: int = 3,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Decodes, resizes and writes a class-per-folder tree as a task store at ``out``; returns its metadata.

    Example:
        >>> prepare_imagefolder("~/data/miniimagenet", "data/miniimagenet", split_files="~/data/miniimagenet/splits")
    """
    src = check_source(source)
    check_size(size)
    if channels not in (1, 3):
        raise DataError(f"--channels {channels}: allowed values are 1 (grey) and 3 (RGB)")
    began = time.perf_counter()
    if split_files is not None:
        splits = read_split_files(src, Path(split_files).expanduser())
        how: dict[str, Any] = {"split_files": str(Path(split_files).expanduser().resolve())}
    else:
        splits = split_by_proportions(scan_tree(src), proportions, seed)
        how = {"proportions": list(proportions), "seed": seed}
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (channels, size, size))
        for split, classes in splits.items():
            items = (  # one class decoded at a time; the writer streams them to disk
                ClassImages(name, name, load_class(files, channels, size), [str(f.relative_to(src)) for f in files])
                for name, files in classes.items()
            )
            writer.write_split(split, items)
        meta = writer.finish(
            {
                "kind": "imagefolder",
                "path": str(src.resolve()),
                "size": size,
                "channels": channels,
                **how,
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
    return meta
