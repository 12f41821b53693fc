"""Reading the pickle files that few-shot data sets circulate as, checked.

CIFAR-100's ``train``/``test``/``meta``, the miniImageNet caches and
tieredImageNet's pickles were written by Python 2 (``cPickle``, protocol 2):
their text is Python 2 ``str``, and NumPy arrays carry their bytes as such a
string. They load in Python 3 with ``encoding="latin1"``, as torchvision
loads CIFAR; copies re-saved by Python 3 load the same way.

Unpickling runs code named in the file, and these files come from file
hosts. The unpickler here builds only the containers, NumPy arrays and
dtypes these data sets consist of; any other object is refused with a
message naming the file, as is a web page saved under the pickle's name
(a download link that now serves HTML), a truncated file or an empty one.

``stream_list`` reads a pickled list one batch of items at a time (the
pickler writes a list in batches of 1000), so tieredImageNet's 448,695 PNGs
never sit in memory together.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from distmaml.data.errors import DataError

try:  # NumPy 2 keeps the array reconstructors in numpy._core, NumPy 1 in numpy.core
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

# Everything a pickle of these data sets refers to by name: NumPy's array and dtype
# reconstruction (under NumPy 1's and NumPy 2's module names, protocols 2 to 5), Python 3's way of pickling bytes
# for protocol 2, and a few containers.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},  # protocol 5
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        (module, name): getattr(builtins, name)
        for module in ("builtins", "__builtin__")
        for name in ("list", "dict", "set", "frozenset", "tuple", "bytearray")
    },
}


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


_DAMAGED = (
    pickle.UnpicklingError,
    _Refused,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    UnicodeError,
    MemoryError,
)
"""What reading a damaged, truncated or foreign pickle raises: each becomes one line naming the file."""


def _find_class(module: str, name: str) -> Any:
    found = _ALLOWED.get((module, name))
    if found is None:
        raise _Refused(module, name)
    return found


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _find_class(module, name)


def check_file(path: Path, what: str) -> None:
    """Refuses a missing or empty file, or a web page saved under a data file's name."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; {what}")
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        raise DataError(f"{path}: the file is empty; download it again")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<!--")) or (
        text.startswith(b"<") and b"<html" in text
    ):
        raise DataError(
            f"{path}: this is a web page (HTML), not the data file; the download link served a page "
            "(a quota or sign-in notice) instead of the file: download it again"
        )


def _damaged(path: Path, error: BaseException) -> DataError:
    if isinstance(error, _Refused):
        return DataError(
            f"{path}: holds a {error.module}.{error.name} object, which this data set's files do not; "
            "is it the right file?"
        )
    if isinstance(error, EOFError) or "truncated" in str(error) or "ran out of input" in str(error).lower():
        return DataError(f"{path}: truncated (the pickle ends early); the download is incomplete, download it again")
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return DataError(f"{path}: not a readable pickle ({reason}); the file is damaged, download it again")


def load_pickle(path: Path, what: str) -> Any:
    """The object pickled in ``path`` (Python 2 or 3); any damage is one ``DataError`` naming the file.

    Args:
        what: what the file should be, said when it is missing
            (e.g. "expected CIFAR-100's meta pickle").
    """
    check_file(path, what)
    try:
        with path.open("rb") as f:
            return _Unpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except _DAMAGED as e:
        raise _damaged(path, e) from None


# -- one batch of a list at a time ------------------------------------------------------------------

_LARGE = 4096
_DROPPED = object()


class _ForgetfulMemo(dict):  # type: ignore[type-arg]
    """The unpickler's memo without the arrays and long strings, so streamed items can be freed.

    A pickle of a list of distinct arrays never refers back to an array or its
    bytes, only to classes, dtypes and short strings; a back-reference to a
    dropped entry is an error, not a silent wrong value.
    """

    def __setitem__(self, key: int, value: Any) -> None:
        if isinstance(value, np.ndarray) or (isinstance(value, (bytes, str, bytearray)) and len(value) > _LARGE):
            value = _DROPPED
        elif isinstance(value, tuple) and any(
            isinstance(v, np.ndarray) or (isinstance(v, (bytes, str)) and len(v) > _LARGE) for v in value
        ):
            value = _DROPPED
        super().__setitem__(key, value)

    def __getitem__(self, key: int) -> Any:
        value = super().__getitem__(key)
        if value is _DROPPED:
            raise pickle.UnpicklingError(
                f"a back-reference to a large object (memo {key}), which a list of images has not"
            )
        return value


# The pure-Python unpickler (the C one cannot be hooked); its dispatch table is extended below.
_PyUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]


class _ListStreamer(_PyUnpickler):
    """The pure-Python unpickler, with the top-level list's items handed to ``consume`` as they come."""

    dispatch: dict[int, Any] = dict(_PyUnpickler.dispatch)

    def __init__(self, file: BinaryIO, consume: Callable[[list[Any]], None]) -> None:
        super().__init__(file, encoding="latin1")
        self.memo = _ForgetfulMemo()
        self._consume = consume
        self._root: list[Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        return _find_class(module, name)

    def _load_empty_list(self) -> None:
        items: list[Any] = []
        if self._root is None and not self.stack and not self.metastack:
            self._root = items
        self.append(items)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        if self.stack[-1] is self._root:
            self._consume(items)
        else:
            self.stack[-1].extend(items)

    def _load_append(self) -> None:
        value = self.stack.pop()
        if self.stack[-1] is self._root:
            self._consume([value])
        else:
            self.stack[-1].append(value)

    dispatch[pickle.EMPTY_LIST[0]] = _load_empty_list
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.APPEND[0]] = _load_append


def stream_list(path: Path, what: str, consume: Callable[[list[Any]], None]) -> None:
    """Calls ``consume`` with each batch of the items of the list pickled in ``path``, in order.

    The items are not kept: memory holds one batch (1000 items as pickle
    writes them) and what ``consume`` keeps. A file that holds no list, or is
    damaged anywhere, is one ``DataError`` naming it (after the batches
    before the damage were consumed: write into a staging folder).
    """
    check_file(path, what)
    try:
        with path.open("rb") as f:
            streamer = _ListStreamer(f, consume)
            result = streamer.load()
    except DataError:
        raise
    except _DAMAGED as e:
        raise _damaged(path, e) from None
    if streamer._root is None or result is not streamer._root:
        raise DataError(f"{path}: holds a {type(result).__name__}, not a list; {what}")
