"""One copy of a split per node: a decoded cache file that every worker maps.

Each worker of a node (a Ray actor, a Ray Train worker, the in-process
engine) samples from the same split. Read privately, miniImageNet's train
split costs each of them about 0.8 GB; ``shared_split`` instead writes the
split's decoded pixels once per node into a cache file and maps it, so the
pages live once, in the kernel's page cache, and every process that maps the
file shares them.

Why a file and not Ray's object store: the file works the same for every
engine and keeps this layer free of Ray; whichever worker comes first decodes
the split on its own node (the driver's node may hold no workers, and a
store on S3 is already copied per node by ``storage.cached_dir``); its clean
pages may be evicted under memory pressure and read back, where object-store
memory is pinned and counts against the store's budget; and it survives the
run, so the next run on the node skips the decoding.

Where: ``$DISTMAML_CACHE/splits`` (default ``~/.cache/distmaml/splits``), on
disk, beside the copies of stores from buckets. ``/dev/shm`` would also
share pages, but it holds them in RAM until someone deletes the file, and
containers often give it 64 MB; set ``DISTMAML_CACHE=/dev/shm/distmaml`` on
a diskless node. The disk cost is the decoded split (N x C x H x W bytes).

Safety:
- The file name carries a key of the store's identity (its folder, the
  bytes of ``metadata.json``, the split file's size, mtime and inode), so a
  store rewritten in place gets a new file; the old version's file is
  deleted then (processes that still map it keep their pages).
- Nothing half-written is ever read: the writer fills a temporary file,
  fsyncs it and renames it into place; a file under the final name is
  complete. A crash mid-write leaves only a temporary file, removed by the
  next writer.
- Workers that start together do not decode twice: the writer holds an
  exclusive ``flock`` on the entry's lock file (released by the kernel if it
  dies); the others wait for it and map its file.
- The mapping is copy-on-write (``MAP_PRIVATE``): a write to the tensor
  would copy that page for the writing process, never change the file.

A cache that cannot be written (read-only or full disk) falls back to a
private copy, with a warning naming ``DISTMAML_CACHE``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import mmap
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from distmaml import storage
from distmaml.data.store import (
    METADATA,
    SplitData,
    StoreInfo,
    class_offsets,
    load_split,
    split_file,
    split_image_chunks,
    split_layout,
)

CACHE_VERSION = 1
"""Bumped when the cache file's layout changes, so old files are never read as new ones."""
SUFFIX = ".u8"


def cache_folder(root: str | os.PathLike[str] | None = None) -> Path:
    """Where decoded splits live: ``root`` or ``$DISTMAML_CACHE``/``~/.cache/distmaml``, then ``splits``."""
    return (Path(root) if root is not None else storage.default_cache_root()) / "splits"


def _store_prefix(info: StoreInfo, split: str) -> str:
    folder = str(Path(info.path).resolve())
    return f"{Path(folder).name}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}-{split}"


def cache_name(info: StoreInfo, split: str) -> str:
    """The split's cache file name: the store's folder and split, and a key of the store's content.

    The key hashes the layout version, the bytes of ``metadata.json`` (which a
    new ``prepare`` rewrites, with its time of creation) and the size, mtime
    and inode of the split's Parquet file, so any rewrite of the store changes
    it. Hashing the pixels themselves would cost each worker a full read.
    """
    stat = (info.path / split_file(split)).stat()
    key = hashlib.sha256()
    key.update(f"{CACHE_VERSION}\0{info.image_shape}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0".encode())
    key.update((info.path / METADATA).read_bytes())
    return f"{_store_prefix(info, split)}-{key.hexdigest()[:16]}{SUFFIX}"


def shared_split(info: StoreInfo, split: str, root: str | os.PathLike[str] | None = None) -> SplitData:
    """The split mapped from this node's cache, written first if no process has.

    Args:
        info: the opened store.
        split: ``train``, ``val`` or ``test``.
        root: the cache root (default ``$DISTMAML_CACHE`` or ``~/.cache/distmaml``).

    Returns:
        The same ``SplitData`` as ``load_split``, its images backed by the
        shared file.

    Example:
        >>> train = shared_split(open_store("data/omniglot"), "train")  # every worker of the node: one copy
    """
    c, h, w = info.image_shape
    offsets = class_offsets(info.splits[split].counts)  # metadata.json's, checked against the rows when written
    size = int(offsets[-1]) * c * h * w
    if size == 0:
        return load_split(info, split)
    folder = cache_folder(root)
    try:
        path = folder / cache_name(info, split)
        if not _complete(path, size):
            _create(info, split, path, size)
    except OSError as e:
        warnings.warn(
            f"task store {info.path}: cannot cache split {split!r} in {folder} ({e}); each worker reads its own copy. "
            f"Point DISTMAML_CACHE at a writable folder with {size / 2**20:.0f} MB free to share one copy per node",
            stacklevel=2,
        )
        return load_split(info, split)
    return SplitData(_map(path, size).view(-1, c, h, w), offsets, info.splits[split].classes)


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:  # the descriptor is what flock locks
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _create(info: StoreInfo, split: str, path: Path, size: int) -> None:
    """Decodes the split into ``path`` unless a process did while this one waited for the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if _complete(path, size):
            return  # another worker wrote it while this one waited
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a writer that died holding the lock
        order, _ = split_layout(info, split)  # checks the rows against metadata.json
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # read-only for others, like the store (mkstemp makes it 0600)
            with os.fdopen(fd, "wb") as f:
                for chunk in split_image_chunks(info, split, order):
                    f.write(chunk.data)
                f.flush()
                os.fsync(f.fileno())  # the data reaches the disk before the name does
            pa.default_memory_pool().release_unused()  # the reader's batches: back to the system
            if os.path.getsize(tmp) != size:
                raise AssertionError(f"{tmp}: wrote {os.path.getsize(tmp)} bytes, expected {size}")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _prune(path)


def _prune(current: Path) -> None:
    """Deletes the files of older versions of the same store's split (mapped copies stay valid)."""
    prefix = current.name[: -len(SUFFIX) - 17]  # without "-<key>.u8"
    for old in current.parent.glob(f"{glob.escape(prefix)}-*"):
        if old.name != current.name and old.name != current.with_suffix(".lock").name:
            old.unlink(missing_ok=True)


def _map(path: Path, size: int) -> torch.Tensor:
    """The file as a flat uint8 tensor, mapped copy-on-write; its clean pages are the node's shared copy."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_WILLNEED"):
        m.madvise(mmap.MADV_WILLNEED)  # start reading ahead: the sampler's first gathers touch pages at random
    return torch.from_numpy(np.frombuffer(m, dtype=np.uint8))  # the array keeps the mapping alive
