"""The task store: one Parquet file per split plus ``metadata.json``.

Layout of a store folder::

    metadata.json     schema version, image shape, classes and images per split, source
    train.parquet     one row per image, rows grouped by class
    val.parquet
    test.parquet

Columns: ``class`` (name, e.g. ``Gurmukhi/character07`` or ``.../rot090``),
``class_index`` (0.. within the split, rows sorted by it), ``group`` (e.g. the
alphabet), ``split``, ``rotation`` (degrees), ``file`` (source path relative
to the source folder, empty for generated images) and ``image``: the uint8
pixels at training resolution, ``C*H*W`` bytes in CHW order
(``fixed_size_binary``), so a whole split reads into one contiguous buffer.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from distmaml.data.errors import DataError
from distmaml.tasks.base import SPLITS

SCHEMA_VERSION = 1
METADATA = "metadata.json"
FORMAT = "distmaml-task-store"
PREPARE_KINDS = ("cifarfs", "fc100", "miniimagenet", "tieredimagenet", "cub", "omniglot", "imagefolder", "glyphs")


def prepare_command(path: str | Path) -> str:
    """The ``distmaml prepare`` command that makes a store at ``path``: its kind when the folder is
    named for one (the recipes read ``data/<kind>``), else every kind."""
    name = Path(str(path)).name
    kind = name if name in PREPARE_KINDS and name != "imagefolder" else "|".join(PREPARE_KINDS)
    return f"`distmaml prepare {kind} --out {path}`"


def split_file(split: str) -> str:
    return f"{split}.parquet"


@dataclass
class ClassImages:
    """The images of one class, as the preparers hand them to the writer."""

    name: str
    group: str
    images: Tensor
    """uint8 ``[n, C, H, W]`` at training resolution."""
    files: list[str]
    rotation: int = 0


@dataclass(frozen=True)
class SplitInfo:
    """What ``metadata.json`` says about one split."""

    classes: list[str]
    counts: list[int]

    @property
    def images(self) -> int:
        return sum(self.counts)

    def smallest(self) -> tuple[str, int]:
        """(name, image count) of the class with the fewest images."""
        i = int(np.argmin(self.counts))
        return self.classes[i], self.counts[i]


@dataclass(frozen=True)
class StoreInfo:
    """A store's metadata, checked."""

    path: Path
    image_shape: tuple[int, int, int]
    splits: dict[str, SplitInfo]
    source: dict[str, Any]
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class SplitData:
    """A split in memory: ``images`` uint8 ``[N, C, H, W]``; class c owns rows ``offsets[c]:offsets[c+1]``."""

    images: Tensor
    offsets: Tensor
    classes: list[str]

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def is_store(path: Path) -> bool:
    return (Path(path) / METADATA).is_file()


def open_store(path: str | Path) -> StoreInfo:
    """Reads and checks ``metadata.json`` of the store at ``path``."""
    path = Path(path).expanduser()
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise DataError(f"no task store at {path} (no {METADATA}); create one with {prepare_command(path)}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"task store {path}: {METADATA} is unreadable ({e}); prepare the store again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"task store {path}: {METADATA} is not a distmaml task store's; prepare the store again")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"task store {path} has schema version {version}, this distmaml reads version {SCHEMA_VERSION}; "
            "prepare it again with `distmaml prepare ... --overwrite`"
        )
    splits = {}
    for split in SPLITS:
        entry = meta["splits"].get(split)
        if entry is None or not (path / split_file(split)).is_file():
            raise DataError(f"task store {path}: split {split!r} is missing; prepare the store again")
        splits[split] = SplitInfo(list(entry["classes"]), [int(c) for c in entry["counts"]])
    c, h, w = (int(v) for v in meta["image_shape"])
    return StoreInfo(path, (c, h, w), splits, dict(meta.get("source", {})), meta["mean"], meta["std"])


def damaged(info: StoreInfo, file: Path | str, error: Exception) -> DataError:
    """The one line for a split file that pyarrow cannot read (truncated, foreign, or damaged on disk)."""
    text = str(error).strip()
    reason = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__
    return DataError(
        f"task store {info.path}: {Path(file).name} is damaged or not a task store's Parquet file ({reason}); "
        f"prepare the store again with `distmaml prepare ... --out {info.path} --overwrite`"
    )


@contextlib.contextmanager
def reading(info: StoreInfo, file: Path | str) -> Iterator[None]:
    """Turns pyarrow's errors while reading ``file`` into ``damaged``'s one line (a column a
    foreign file lacks is a ``KeyError`` from pyarrow)."""
    try:
        yield
    except (pa.ArrowException, KeyError) as e:
        raise damaged(info, file, e) from None


def split_layout(info: StoreInfo, split: str) -> tuple[Tensor | None, Tensor]:
    """Checks a split's rows against ``metadata.json``; returns (row order, class offsets).

    The order is None when the rows are grouped by class, as ``StoreWriter``
    writes them; otherwise it is the stable sort of the rows by class (a tool
    shuffled them). Reads the ``class_index`` column only.
    """
    file = info.path / split_file(split)
    with reading(info, file):
        index_np = pq.read_table(file, columns=["class_index"]).column("class_index").to_numpy()
    expected = info.splits[split]
    if len(index_np) != expected.images:
        raise DataError(
            f"task store {info.path}: {file.name} holds {len(index_np)} images, metadata says {expected.images}"
        )
    index = torch.from_numpy(index_np.astype(np.int64))
    order = None
    if len(index) and bool((index[1:] < index[:-1]).any()):
        order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=len(expected.classes))
    if counts.tolist() != expected.counts:
        raise DataError(f"task store {info.path}: class sizes in {file.name} differ from {METADATA}")
    return order, class_offsets(counts)


def class_offsets(counts: Tensor | list[int]) -> Tensor:
    """Where each class's rows start, and the end: ``[0, n0, n0 + n1, ...]`` (int64)."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets


def _pixels(info: StoreInfo, file: str, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The bytes of an ``image`` column as a flat uint8 view (no copy for one chunk)."""
    c, h, w = info.image_shape
    width = c * h * w
    if column.type != pa.binary(width):
        raise DataError(f"task store {info.path}: images in {file} are {column.type}, expected {width} bytes each")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width, offset=column.offset * width)


def split_image_chunks(
    info: StoreInfo, split: str, order: Tensor | None, chunk_bytes: int = 8 << 20
) -> Iterator[np.ndarray]:
    """The split's pixels in class order, as flat uint8 chunks of about ``chunk_bytes``.

    Rows grouped by class stream from the file a batch at a time, so a
    consumer that writes them out holds one batch, not the split; shuffled
    rows (``order``) are read whole and reordered.
    """
    file = info.path / split_file(split)
    c, h, w = info.image_shape
    if order is None:
        rows = max(1, chunk_bytes // (c * h * w))
        with reading(info, file):
            batches = pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False).iter_batches(
                batch_size=rows, columns=["image"], use_threads=False
            )
            for batch in batches:
                yield _pixels(info, file.name, batch.column(0))
        return
    with reading(info, file):
        column = pq.read_table(file, columns=["image"]).column("image")
    flat = _pixels(info, file.name, column)
    yield flat.reshape(-1, c * h * w)[order.numpy()].reshape(-1)


def load_split(info: StoreInfo, split: str) -> SplitData:
    """Reads one split into this process's memory: a single uint8 tensor and the class offsets.

    ``distmaml.data.splitcache.shared_split`` maps the same split from one
    copy per node instead.
    """
    order, offsets = split_layout(info, split)
    c, h, w = info.image_shape
    n = int(offsets[-1])
    images = torch.empty(n * c * h * w, dtype=torch.uint8)
    out, done = images.numpy(), 0
    for chunk in split_image_chunks(info, split, order):
        out[done : done + len(chunk)] = chunk
        done += len(chunk)
    pa.default_memory_pool().release_unused()  # the reader's batches: back to the system, not kept by the pool
    return SplitData(images.view(n, c, h, w), offsets, info.splits[split].classes)


_SCHEMA = pa.schema(
    [
        ("class", pa.string()),
        ("class_index", pa.int32()),
        ("group", pa.string()),
        ("split", pa.string()),
        ("rotation", pa.int16()),
        ("file", pa.string()),
    ]
)


class StoreWriter:
    """Writes the splits of a store into ``folder`` (a temporary folder; see ``prepare.staged_output``).

    A split is written class by class: ``write_split`` takes any iterable of
    ``ClassImages`` (a generator decodes one class while the previous ones are
    already on disk) and holds at most ``buffer_bytes`` of pixels at a time,
    so a split larger than memory (tieredImageNet's train split is 9.5 GB
    decoded) streams through.
    """

    def __init__(self, folder: Path, image_shape: tuple[int, int, int], buffer_bytes: int = 128 << 20) -> None:
        self.folder = Path(folder)
        self.image_shape = image_shape
        self.buffer_bytes = buffer_bytes
        self.splits: dict[str, SplitInfo] = {}
        self._sum = np.zeros(image_shape[0])
        self._sumsq = np.zeros(image_shape[0])
        self._pixels = 0

    def write_split(self, split: str, classes: Iterable[ClassImages]) -> None:
        """Writes ``split.parquet``: every image of ``classes``, grouped by class in the given order."""
        with self.split(split) as out:
            for cls in classes:
                out.add(cls)

    @contextmanager
    def split(self, split: str) -> Iterator[SplitWriter]:
        """A writer of ``split.parquet`` that takes one class at a time (``add``), for readers that push."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: allowed values are {SPLITS}")
        out = SplitWriter(self, split)
        try:
            yield out
        except BaseException:
            out.abort()  # the staging folder is removed anyway; no last flush of a failed split
            raise
        out.close()
        self.splits[split] = SplitInfo(out.names, out.counts)

    def _add_statistics(self, imgs: Tensor) -> None:
        x = imgs.double().div(255).transpose(0, 1).reshape(imgs.shape[1], -1)
        self._sum += x.sum(1).numpy()
        self._sumsq += (x * x).sum(1).numpy()
        self._pixels += x.shape[1]

    @staticmethod
    def _table(split: str, classes: list[ClassImages], first: int, schema: pa.Schema, width: int) -> pa.Table:
        """The rows of ``classes`` (class indices from ``first``) as one table."""
        cols: dict[str, list[Any]] = {name: [] for name in _SCHEMA.names}
        blobs = []
        for i, cls in enumerate(classes, start=first):
            k = cls.images.shape[0]
            cols["class"] += [cls.name] * k
            cols["class_index"] += [i] * k
            cols["group"] += [cls.group] * k
            cols["split"] += [split] * k
            cols["rotation"] += [cls.rotation] * k
            cols["file"] += list(cls.files) if cls.files else [""] * k
            blobs.append(cls.images.contiguous().numpy().reshape(-1))
        pixels = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(cols["class"]), [None, pa.py_buffer(pixels)])
        arrays = [pa.array(cols[name], type=_SCHEMA.field(name).type) for name in _SCHEMA.names]
        return pa.Table.from_arrays([*arrays, image], schema=schema)

    def finish(self, source: dict[str, Any]) -> dict[str, Any]:
        """Writes ``metadata.json`` (last, so a folder with it is a complete store); returns it."""
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"splits {missing} were not written")
        mean = self._sum / max(self._pixels, 1)
        std = np.sqrt(np.maximum(self._sumsq / max(self._pixels, 1) - mean * mean, 1e-12))
        meta = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "image_shape": list(self.image_shape),
            "dtype": "uint8",
            "mean": mean.tolist(),
            "std": std.tolist(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "splits": {
                s: {"classes": info.classes, "counts": info.counts, "images": info.images}
                for s, info in self.splits.items()
            },
        }
        (self.folder / METADATA).write_text(json.dumps(meta, indent=1))
        return meta


class SplitWriter:
    """Writes one split's rows, class by class, holding at most ``buffer_bytes`` of pixels."""

    def __init__(self, store: StoreWriter, split: str) -> None:
        self.store, self.split = store, split
        self.width = int(np.prod(store.image_shape))
        self.schema = _SCHEMA.append(pa.field("image", pa.binary(self.width)))
        self.names: list[str] = []
        self.counts: list[int] = []
        self._pending: list[ClassImages] = []
        self._pending_bytes = 0
        self._out = pq.ParquetWriter(store.folder / split_file(split), self.schema, compression="zstd")

    def add(self, cls: ClassImages) -> None:
        """Appends a class (its index is the number of classes added before it)."""
        imgs = cls.images
        if imgs.dtype != torch.uint8 or tuple(imgs.shape[1:]) != self.store.image_shape:
            raise ValueError(
                f"class {cls.name!r}: images must be uint8 {self.store.image_shape}, got {imgs.dtype} "
                f"{tuple(imgs.shape[1:])}"
            )
        if self.split == "train":
            self.store._add_statistics(imgs)
        self._pending.append(cls)
        self._pending_bytes += imgs.numel()
        self.names.append(cls.name)
        self.counts.append(int(imgs.shape[0]))
        if self._pending_bytes >= self.store.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        first = len(self.names) - len(self._pending)
        table = StoreWriter._table(self.split, self._pending, first, self.schema, self.width)
        self._out.write_table(table, 65536)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        if self._pending or not self.names:
            self._flush()
        self._out.close()

    def abort(self) -> None:
        self._pending = []
        self._out.close()


def describe_store(info: StoreInfo) -> str:
    """One line: classes and images per split and the image shape."""
    c, h, w = info.image_shape
    parts = [f"{s} {len(i.classes)} classes / {i.images} images" for s, i in info.splits.items()]
    return f"{'; '.join(parts)} ({h}x{w}, {c} channel{'s' if c > 1 else ''})"
