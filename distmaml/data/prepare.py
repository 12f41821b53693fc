"""What every ``distmaml prepare`` shares: staging, decoding, resizing.

A store is written into a hidden temporary folder beside ``--out`` and renamed
into place at the end, so an interrupted or failed run leaves no store (and,
unless killed outright, no temporary folder either). ``metadata.json`` is the
last file written: a folder holding it is a complete store.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from distmaml.data.errors import DataError
from distmaml.data.store import is_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuses an ``--out`` that holds a store (unless ``overwrite``) or anything else."""
    if not out.exists():
        return
    if is_store(out):
        if not overwrite:
            raise DataError(f"--out {out} already holds a task store; pass --overwrite to replace it")
        return
    if not out.is_dir() or any(out.iterdir()):
        raise DataError(f"--out {out} exists and is not an empty folder or a task store; choose another --out")


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yields a temporary folder; on success it becomes ``out``, on any error it is removed.

    Args:
        overwrite: replace a store already at ``out``.
        keep_existing: if another process finished a store at ``out`` first,
            keep that one and discard ours (first-use preparation of a cache).
    """
    out = Path(out).expanduser()
    check_output(out, overwrite or keep_existing)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and is_store(out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out.exists() and (is_store(out) or not any(out.iterdir())):
        old = out.parent / f".{out.name}.old-{tag}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if keep_existing and is_store(out):  # lost a race to another preparer
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if old is not None:
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_image(path: Path, channels: int) -> Tensor:
    """Decodes an image file to uint8 ``[channels, H, W]`` (1: grey, 3: RGB); a bad file is named."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        data = read_file(str(path))
        image = decode_image(data, mode=mode)
    except Exception as e:  # torchvision raises RuntimeError for corrupt or unknown files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot decode image {path}: {reason}") from None
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = (image.float() / 257).round().clamp(0, 255).to(torch.uint8)
    return image


def resize(images: Tensor, size: int) -> Tensor:
    """uint8 ``[..., C, H, W]`` -> uint8 ``[..., C, size, size]`` (bilinear, antialiased)."""
    from torchvision.transforms.v2 import functional as F

    if images.shape[-2:] == (size, size):
        return images
    return F.resize(images, [size, size], antialias=True)


def load_class(files: list[Path], channels: int, size: int) -> Tensor:
    """Decodes and resizes one class's images into uint8 ``[n, C, size, size]``."""
    return torch.stack([resize(read_image(f, channels), size) for f in files])


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"--source {path}: no such folder")
    return path


def check_size(size: int) -> None:
    if size < 16:
        raise DataError(f"--size {size}: must be at least 16 (the 4-conv net halves the image 4 times)")
