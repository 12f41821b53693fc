"""``distmaml prepare tieredimagenet``: Ren et al.'s tieredImageNet to a task store.

tieredImageNet (Ren et al., ICLR 2018, "Meta-Learning for Semi-Supervised
Few-Shot Classification") groups 608 ImageNet classes into 34 categories;
20 categories (351 classes, 448,695 images) are meta-train, 6 (97 classes,
124,261 images) meta-validation, 8 (160 classes, 206,209 images) meta-test,
all 84x84 RGB. The split is the files'. Two on-disk forms circulate, both
from the authors' code (few-shot-ssl-public, ``fewshot/data/``):

* the release: ``{split}_images_png.pkl``, a Python 2 pickle of a list with
  one PNG per image (``cv2.imencode('.png', image)[1]``: a uint8 array),
  12.9 GB as a tar, 29 GB of PNG bytes unpacked;
* ``{split}_images.npz`` with the key ``images``, uint8 ``[N, 84, 84, 3]``,
  which their ``decompress`` writes from the PNGs with ``cv2.imdecode``, so
  in cv2's BGR channel order (``npz_order="bgr"``, flipped to RGB here).

Both come with ``{split}_labels.pkl``: a dict with ``label_specific`` (the
class of each image, int), ``label_general`` (its category),
``label_specific_str`` and ``label_general_str`` (their names).

Nothing holds a split decoded: PNGs are read from the pickle 1000 at a time
(``pickles.stream_list``) and the npz array a chunk of rows at a time, and
each class goes to the store when its last image is read. The files list a
class's images together; if a class's images were scattered, they would go
through a scratch file in the staging folder first.
"""

from __future__ import annotations

import re
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distmaml.data.errors import DataError
from distmaml.data.pickles import check_file, load_pickle, stream_list
from distmaml.data.prepare import check_size, check_source, resize, staged_output
from distmaml.data.store import ClassImages, SplitWriter, StoreWriter
from distmaml.tasks.base import SPLITS

PAPER_CLASSES = (351, 97, 160)
FOLDER = "tiered-imagenet"  # the release's tar unpacks into it
NPZ_CHUNK_ROWS = 1024


def png_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_images_png.pkl"


def npz_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_images.npz"


def labels_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_labels.pkl"


@dataclass(frozen=True)
class Labels:
    """One split's labels: the class of each image, and each class's name and category."""

    of_image: np.ndarray
    names: dict[int, str]
    groups: dict[int, str]


def read_labels(path: Path) -> Labels:
    """Reads and checks ``{split}_labels.pkl``."""
    data = load_pickle(path, "expected tieredImageNet's {split}_labels.pkl beside the images")
    if isinstance(data, dict):  # Python 2's str keys read as bytes by some tools: either kind
        data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    if not isinstance(data, dict) or "label_specific" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with 'label_specific' (and label_general, ...), found {found}")
    try:
        specific = np.asarray(data["label_specific"]).astype(np.int64, casting="same_kind").reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'label_specific' should be an integer per image") from None
    if len(specific) == 0 or specific.min() < 0:
        raise DataError(f"{path}: 'label_specific' is empty or negative")
    text = _texts(data.get("label_specific_str"))
    general = data.get("label_general")
    general_text = _texts(data.get("label_general_str"))
    names: dict[int, str] = {}
    groups: dict[int, str] = {}
    first = {int(c): int(i) for i, c in reversed(list(enumerate(specific.tolist())))}
    used: set[str] = set()
    for c in sorted(first):
        name = text[c] if c < len(text) else f"class{c:03d}"
        if name in used:  # ImageNet repeats a few names (two 'crane's); keep every class apart
            name = f"{name} ({c})"
        used.add(name)
        names[c] = name
        g = (
            int(np.asarray(general).reshape(-1)[first[c]])
            if general is not None and len(general) == len(specific)
            else -1
        )
        groups[c] = general_text[g] if 0 <= g < len(general_text) else (str(g) if g >= 0 else name)
    return Labels(specific, names, groups)


def _texts(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value]


class ClassAssembler:
    """Takes a split's images in file order and hands each finished class to the split writer.

    Classes are numbered in the order they first appear. When every class's
    images are contiguous in the file (the release's order), a class is
    written as soon as the next one starts; otherwise the decoded images go
    to a scratch file first (``scratch``, in the staging folder) and the
    classes are gathered from it at the end.
    """

    def __init__(self, labels: Labels, out: SplitWriter, source: str, shape: tuple[int, int, int], scratch: Path):
        self.labels, self.out, self.source = labels, out, source
        of = labels.of_image
        change = np.flatnonzero(np.diff(of)) + 1
        runs = of[np.concatenate([[0], change])] if len(of) else of
        self.contiguous = len(np.unique(runs)) == len(runs)
        self.done = 0
        self._label, self._first = -1, 0
        self._current: list[Tensor] = []
        self._spool: np.ndarray | None = None
        if not self.contiguous:
            self._scratch = scratch
            self._spool = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(of), *shape))

    def add(self, images: Tensor) -> None:
        """The next images of the file, uint8 ``[n, C, H, W]`` at the store's size."""
        n, of = len(images), self.labels.of_image
        if self.done + n > len(of):
            raise DataError(f"{self.source}: holds more images than its labels file has labels ({len(of)})")
        if self._spool is not None:
            self._spool[self.done : self.done + n] = images.numpy()
            self.done += n
            return
        labels = of[self.done : self.done + n]
        starts = (np.flatnonzero(labels[1:] != labels[:-1]) + 1).tolist()
        for start, stop in zip([0, *starts], [*starts, n]):
            label = int(labels[start])
            if self._current and label != self._label:
                self._emit()
            if not self._current:
                self._label, self._first = label, self.done + start
            self._current.append(images[start:stop])
        self.done += n

    def _emit(self) -> None:
        images = torch.cat(self._current)
        self._current = []
        files = [f"{Path(self.source).name}[{r}]" for r in range(self._first, self._first + len(images))]
        self.out.add(ClassImages(self.labels.names[self._label], self.labels.groups[self._label], images, files))

    def finish(self) -> None:
        of = self.labels.of_image
        if self.done != len(of):
            raise DataError(
                f"{self.source}: holds {self.done} images, its labels file {len(of)}; a file of another split "
                "or a damaged one"
            )
        if self._current:
            self._emit()
        if self._spool is None:
            return
        order = {int(c): None for c in of.tolist()}  # first appearance
        for label in order:
            rows = np.flatnonzero(of == label)
            files = [f"{Path(self.source).name}[{r}]" for r in rows.tolist()]
            images = torch.from_numpy(np.ascontiguousarray(self._spool[rows]))
            self.out.add(ClassImages(self.labels.names[label], self.labels.groups[label], images, files))
        self._spool = None
        self._scratch.unlink()


def decode_png(data: Any, path: Path, index: int) -> Tensor:
    """One PNG of the pickle (a uint8 array or bytes) as uint8 RGB ``[3, H, W]``."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_png as _decode

    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    if not isinstance(raw, (bytes, bytearray, str)):
        raise DataError(f"{path}: item {index} is a {type(data).__name__}, not a PNG; is it the right file?")
    if isinstance(raw, str):  # Python 2 bytes read as latin1 text
        raw = raw.encode("latin1")
    try:
        return _decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "not a PNG"
        reason = re.sub(r"^.*?\.cpp:\d+,\s*", "", reason)  # torchvision's source location: not the user's concern
        raise DataError(f"{path}: item {index} is not a decodable PNG ({reason}); the file is damaged") from None


def _png_split(path: Path, assembler: ClassAssembler, size: int) -> None:
    def consume(items: list[Any]) -> None:
        first = assembler.done
        decoded = [resize(decode_png(item, path, first + k), size) for k, item in enumerate(items)]
        assembler.add(torch.stack(decoded))

    stream_list(path, "expected tieredImageNet's {split}_images_png.pkl", consume)


def _npz_split(path: Path, assembler: ClassAssembler, size: int, order: str) -> None:
    check_file(path, "expected tieredImageNet's {split}_images.npz")
    try:
        with zipfile.ZipFile(path) as z, z.open(_npz_member(z, path)) as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                raise DataError(
                    f"{path}: 'images' should be uint8 [N, H, W, 3] in C order, found {dtype} {list(shape)}"
                )
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], NPZ_CHUNK_ROWS):
                n = min(NPZ_CHUNK_ROWS, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise DataError(f"{path}: truncated (images end at row {start + len(buf) // row} of {shape[0]})")
                hwc = np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])
                if order == "bgr":
                    hwc = hwc[..., ::-1]
                chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
                assembler.add(resize(chw, size))
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable .npz ({reason}); the file is damaged, download it again") from None


def _npz_member(z: zipfile.ZipFile, path: Path) -> str:
    if "images.npy" not in z.namelist():
        raise DataError(f"{path}: no 'images' array in it (holds {', '.join(z.namelist()) or 'nothing'})")
    return "images.npy"


def tiered_root(source: Path) -> Path:
    """``source``, or its ``tiered-imagenet/`` where the release's tar unpacks."""
    if not labels_file(source, "train").exists() and (source / FOLDER).is_dir():
        return source / FOLDER
    return source


def image_files(folder: Path) -> dict[str, tuple[str, Path]]:
    """Each split's images: ("png", path) or ("npz", path), whichever the folder holds (PNG first)."""
    found: dict[str, tuple[str, Path]] = {}
    for split in SPLITS:
        if png_file(folder, split).is_file():
            found[split] = ("png", png_file(folder, split))
        elif npz_file(folder, split).is_file():
            found[split] = ("npz", npz_file(folder, split))
        else:
            raise DataError(
                f"--source {folder}: neither {png_file(folder, split).name} nor {npz_file(folder, split).name}; "
                "expected tieredImageNet as Ren et al. release it ({split}_images_png.pkl and {split}_labels.pkl "
                "for train, val and test), or the .npz form"
            )
        if not labels_file(folder, split).is_file():
            raise DataError(f"{labels_file(folder, split)}: no such file; every split's images need their labels file")
    return found


def prepare_tieredimagenet(
    source: str | Path, out: str | Path, *, size: int = 84, npz_order: str = "bgr", overwrite: bool = False
) -> dict[str, Any]:
    """Writes tieredImageNet's three splits as a task store at ``out``, streaming.

    Args:
        npz_order: channel order of ``{split}_images.npz`` (``bgr``: as the
            authors' ``decompress`` writes it; ``rgb``).

    Example:
        >>> prepare_tieredimagenet("~/data/tiered-imagenet", "data/tieredimagenet")
    """
    if npz_order not in ("bgr", "rgb"):
        raise DataError(f"--npz-order {npz_order!r}: allowed values are bgr, rgb")
    src = tiered_root(check_source(source))
    check_size(size)
    began = time.perf_counter()
    files = image_files(src)
    labels = {split: read_labels(labels_file(src, split)) for split in SPLITS}  # all checked before any decoding
    seen: dict[str, str] = {}
    for split, lab in labels.items():
        for name in lab.names.values():
            if seen.setdefault(name, split) != split:
                raise DataError(
                    f"{labels_file(src, split)}: class {name!r} is also in {seen[name]}; splits must not share"
                )
    with staged_output(out, overwrite) as tmp:
        writer = StoreWriter(tmp, (3, size, size))
        for split in SPLITS:
            variant, path = files[split]
            with writer.split(split) as split_out:
                assembler = ClassAssembler(
                    labels[split], split_out, str(path), (3, size, size), tmp / f"{split}.scratch.npy"
                )
                if variant == "png":
                    _png_split(path, assembler, size)
                else:
                    _npz_split(path, assembler, size, npz_order)
                assembler.finish()
        formats = sorted({v for v, _ in files.values()})
        meta = writer.finish(
            {"kind": "tieredimagenet", "path": str(src.resolve()), "size": size, "files": formats,
             **({"npz_order": npz_order} if "npz" in formats else {}),
             "seconds": round(time.perf_counter() - began, 2)}
        )  # fmt: skip
    return meta
