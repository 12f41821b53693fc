"""``distmaml prepare omniglot``: Omniglot's own folders to a task store.

Omniglot (Lake et al., 2015) unzips to ``images_background/`` (30 alphabets)
and ``images_evaluation/`` (20 alphabets), each ``<alphabet>/<characterNN>/*.png``
with 20 drawings of 105x105 per character. A character is a class; its
alphabet is its group.

Class splits:

* ``paper`` (default, as MAML and most papers): all characters shuffled with
  ``seed``; the first ``train_classes`` (1100) meta-train, the next
  ``val_classes`` (100) meta-validation, the rest (423) meta-test.
* ``alphabets``: Omniglot's own; the evaluation alphabets are meta-test,
  ``val_classes`` characters drawn by seed from the background alphabets are
  meta-validation, the other background characters meta-train.

With ``rotations`` (default) each meta-train character rotated by 90, 180
and 270 degrees is a new class (Santoro et al., 2016), so meta-train holds
4x its characters; validation and test classes are never rotated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmaml.data.errors import DataError
from distmaml.data.prepare import check_size, check_source, image_files, load_class, staged_output
from distmaml.data.store import ClassImages, StoreWriter

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
TORCHVISION_FOLDER = "omniglot-py"
ROTATIONS = (90, 180, 270)


@dataclass(frozen=True)
class Character:
    """One class of the source: ``images_background/Latin/character03``."""

    part: str
    alphabet: str
    character: str
    files: list[Path]

    @property
    def name(self) -> str:
        return f"{self.alphabet}/{self.character}"


def omniglot_root(source: Path) -> Path:
    """``source``, or its ``omniglot-py/`` where torchvision keeps the same two folders.

    ``torchvision.datasets.Omniglot(root, download=True)`` unzips into
    ``root/omniglot-py/images_background`` (and ``images_evaluation`` when
    asked with ``background=False``), next to the zip files; the folders
    inside are Omniglot's own, so pointing ``--source`` at ``root`` or at
    ``root/omniglot-py`` gives the same store.
    """
    inner = source / TORCHVISION_FOLDER
    has_parts = any((source / p).is_dir() for p in (BACKGROUND, EVALUATION))
    return inner if not has_parts and inner.is_dir() else source


def scan(source: Path) -> list[Character]:
    """Every character folder under ``source``, in sorted order; a wrong layout is named."""
    parts = [p for p in (BACKGROUND, EVALUATION) if (source / p).is_dir()]
    if not parts:
        raise DataError(
            f"--source {source}: not an Omniglot folder; expected {BACKGROUND}/ and {EVALUATION}/ inside it "
            f"(or inside its {TORCHVISION_FOLDER}/, as torchvision leaves them), each holding "
            "<alphabet>/<characterNN>/*.png"
        )
    out: list[Character] = []
    for part in parts:
        alphabets = sorted(p for p in (source / part).iterdir() if p.is_dir())
        if not alphabets:
            raise DataError(f"{source / part}: no alphabet folders; expected <alphabet>/<characterNN>/*.png")
        for alphabet in alphabets:
            characters = sorted(p for p in alphabet.iterdir() if p.is_dir())
            if not characters:
                raise DataError(f"{alphabet}: no character folders; expected <characterNN>/*.png inside each alphabet")
            for ch in characters:
                files = image_files(ch)
                if not files:
                    raise DataError(f"{ch}: no .png images in this character folder")
                out.append(Character(part, alphabet.name, ch.name, files))
    return out


def split_characters(
    chars: list[Character], split: str, train_classes: int, val_classes: int, seed: int
) -> dict[str, list[Character]]:
    """The class split ``paper`` or ``alphabets`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if split == "paper":
        need = train_classes + val_classes + 1
        if len(chars) < need:
            raise DataError(
                f"--split paper needs more than {train_classes} + {val_classes} characters (meta-train + "
                f"meta-validation, the rest meta-test); the source has {len(chars)}; lower --train-classes and "
                "--val-classes or use --split alphabets"
            )
        order = [chars[i] for i in torch.randperm(len(chars), generator=g).tolist()]
        return {
            "train": order[:train_classes],
            "val": order[train_classes : train_classes + val_classes],
            "test": order[train_classes + val_classes :],
        }
    if split == "alphabets":
        background = [c for c in chars if c.part == BACKGROUND]
        evaluation = [c for c in chars if c.part == EVALUATION]
        if not evaluation or len(background) <= val_classes:
            raise DataError(
                f"--split alphabets needs {EVALUATION}/ (meta-test) and more than --val-classes {val_classes} "
                f"characters in {BACKGROUND}/; the source has {len(evaluation)} and {len(background)}"
            )
        pick = set(torch.randperm(len(background), generator=g)[:val_classes].tolist())
        return {
            "train": [c for i, c in enumerate(background) if i not in pick],
            "val": [c for i, c in enumerate(background) if i in pick],
            "test": evaluation,
        }
    raise DataError(f"--split {split!r}: allowed values are paper, alphabets")


def _classes(src: Path, members: list[Character], size: int, rotations: bool) -> Iterator[ClassImages]:
    """Each character decoded (and, with ``rotations``, turned), one at a time."""
    for ch in members:
        images = load_class(ch.files, 1, size)
        files = [str(f.relative_to(src)) for f in ch.files]
        yield ClassImages(ch.name, ch.alphabet, images, files)
        if rotations:
            for angle in ROTATIONS:
                turned = torch.rot90(images, k=angle // 90, dims=(2, 3)).contiguous()
                yield ClassImages(f"{ch.name}/rot{angle:03d}", ch.alphabet, turned, files, angle)


def prepare_omniglot(
    source: str | Path,
    out: str | Path,
    *,
    size: int = 28,
    split: str = "paper",
    train_classes: int = 1100,
    val_classes: int = 100,
    rotations: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Decodes, resizes and writes Omniglot as a task store at ``out``; returns its metadata.

    Example:
        >>> prepare_omniglot("~/data/omniglot", "data/omniglot")  # paper split, 28x28, rotations
    """
    src = omniglot_root(check_source(source))
    check_size(size)
    if train_classes < 1 or val_classes < 1:
        raise DataError("--train-classes and --val-classes must be at least 1")
    began = time.perf_counter()
    chars = scan(src)
    splits = split_characters(chars, split, train_classes, val_classes, seed)
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (1, size, size))
        for name, members in splits.items():
            writer.write_split(name, _classes(src, members, size, rotations and name == "train"))
        options = {"size": size, "split": split, "train_classes": train_classes, "val_classes": val_classes}
        source_info = {"kind": "omniglot", "path": str(src.resolve()), **options, "rotations": rotations}
        meta = writer.finish({**source_info, "seed": seed, "seconds": round(time.perf_counter() - began, 2)})
    return meta
