"""Where runs and task stores live: local folders or object stores, through ``pyarrow.fs``.

A run directory on one node of a cluster is lost with that node, so ``--out``,
``--resume`` and ``data.path`` also accept URIs (``s3://bucket/runs/a``,
``gs://bucket/stores/omniglot``). Every function here takes either a local path
or a URI; local paths keep the plain ``os``/``pathlib`` behaviour (and return
``Path`` objects), URIs go through ``pyarrow.fs.FileSystem.from_uri``.

S3-compatible servers (MinIO, Ceph, moto): set ``AWS_ENDPOINT_URL``, which
Arrow reads itself, or ``DISTMAML_S3_ENDPOINT`` (``http://host:port``), which
is added to every ``s3://`` URI as ``endpoint_override`` and ``scheme``.
Credentials come from the usual AWS/GCP environment and config files.

Example:
    >>> write_bytes_atomic("s3://bucket/run/result.json", b"{}")
    >>> read_bytes(join("s3://bucket/run", "result.json"))
    b'{}'
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from distmaml.errors import DistmamlError

Location = Path | str
"""A local path (``Path``) or an object-store URI (``str``)."""

ENDPOINT_ENV = "DISTMAML_S3_ENDPOINT"
CACHE_ENV = "DISTMAML_CACHE"


class StorageError(DistmamlError, OSError):
    """A location that cannot be read or written as asked; the message says which and why."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def location(path: str | os.PathLike[str]) -> Location:
    """``Path`` for a local path (``file://`` stripped), the URI string otherwise."""
    text = os.fspath(path)
    if is_uri(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = urlparse(text).path
    return Path(text)


def join(base: str | os.PathLike[str], *parts: str) -> Location:
    """``base/part/...`` for a local path or a URI."""
    loc = location(base)
    if isinstance(loc, Path):
        return loc.joinpath(*parts)
    return "/".join([loc, *(p.strip("/") for p in parts)])


def parent(path: str | os.PathLike[str]) -> Location:
    """The folder holding ``path``."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.parent
    head, _, _ = loc.rpartition("/")
    return head


def name(path: str | os.PathLike[str]) -> str:
    """The last component of ``path``."""
    loc = location(path)
    return loc.name if isinstance(loc, Path) else loc.rpartition("/")[2]


def _with_endpoint(uri: str) -> str:
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint or not uri.startswith("s3://") or "endpoint_override=" in uri:
        return uri
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    sep = "&" if "?" in uri else "?"
    return f"{uri}{sep}endpoint_override={parsed.netloc}&scheme={parsed.scheme}"


@functools.lru_cache(maxsize=32)
def _filesystem(scheme_and_bucket: str, endpoints: tuple[str | None, str | None]) -> pafs.FileSystem:
    # One FileSystem per bucket and endpoint: creating an S3 client costs a few ms and a thread pool.
    # The endpoints are part of the key so that a changed environment is honoured.
    fs, _ = pafs.FileSystem.from_uri(_with_endpoint(scheme_and_bucket))
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow`` filesystem and the path inside it for a URI."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: a URI needs a bucket, for example s3://bucket/runs/a")
    try:
        endpoints = (os.environ.get(ENDPOINT_ENV), os.environ.get("AWS_ENDPOINT_URL"))
        fs = _filesystem(f"{parsed.scheme}://{parsed.netloc}", endpoints)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad options
        raise StorageError(f"{uri}: cannot open this location ({e}); use s3://, gs:// or a local path") from e
    return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a file; ``FileNotFoundError`` if there is none."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, p = resolve(loc)
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(f"{loc}: no such file")
    with fs.open_input_stream(p) as f:
        return bytes(f.read())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` so that readers see the old content or the new, never a part.

    Local: a temporary file in the same folder, fsync, then ``os.replace``.
    Object stores: one upload. An S3 or GCS object becomes visible only when its
    PUT (or the completion of its multipart upload) succeeds, whole, and then
    replaces the old object at once; a writer killed mid-upload leaves no object
    (at most an incomplete multipart upload, which a bucket lifecycle rule
    aborts). A temporary key plus a copy would add a second full upload and
    no safety, since object stores have no rename.
    """
    loc = location(path)
    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=loc.parent, prefix=f".{loc.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, p = resolve(loc)
    # One write of the whole buffer: no partial content is ever handed to the stream.
    with fs.open_output_stream(p) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` to ``path`` (a local path or a URI) atomically, as ``write_bytes_atomic``."""
    write_bytes_atomic(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON to ``path``, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def exists(path: str | os.PathLike[str]) -> bool:
    """True if a file or folder is there."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.exists()
    fs, p = resolve(loc)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder (an object-store prefix with objects under it)."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.is_dir()
    fs, p = resolve(loc)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def is_file(path: str | os.PathLike[str]) -> bool:
    loc = location(path)
    if isinstance(loc, Path):
        return loc.is_file()
    fs, p = resolve(loc)
    return fs.get_file_info(p).type == pafs.FileType.File


def listdir(path: str | os.PathLike[str]) -> list[str]:
    """Sorted names directly under a folder; empty if it does not exist."""
    loc = location(path)
    if isinstance(loc, Path):
        return sorted(p.name for p in loc.iterdir()) if loc.is_dir() else []
    fs, p = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete(path: str | os.PathLike[str]) -> None:
    """Removes a file; a missing file is not an error."""
    loc = location(path)
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
        return
    fs, p = resolve(loc)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def makedirs(path: str | os.PathLike[str]) -> None:
    """Creates a local folder and its parents; nothing to do on object stores (prefixes are implicit)."""
    loc = location(path)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)


def check_writable(path: str | os.PathLike[str], what: str = "--out") -> None:
    """Refuses a run directory that cannot be written, before any work starts.

    Writes and deletes a small probe file through the same code path as the
    checkpoints, so a read-only mount, a missing bucket or absent credentials
    fail here, in a second, rather than after the first hour of training.
    """
    probe = join(path, f".distmaml-probe-{uuid.uuid4().hex}")
    try:
        makedirs(path)
        write_bytes_atomic(probe, b"probe")
        delete(probe)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(
            f"{what} {location(path)}: cannot write there ({reason}); choose a writable folder or bucket"
        ) from e


def upload_dir(local: str | os.PathLike[str], uri: str, last: str = "metadata.json") -> None:
    """Copies a local folder to an object-store URI, file by file, with ``last`` uploaded at the end.

    Object stores have no folder rename, so a store is published by its
    metadata file: it is deleted first and uploaded last, and a reader that
    finds it finds every file it names.
    """
    src = Path(local)
    fs, root = resolve(uri)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(src).as_posix() == last)  # stable: ``last`` goes to the end
    if fs.get_file_info(f"{root}/{last}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{last}")
    for p in files:
        with fs.open_output_stream(f"{root}/{p.relative_to(src).as_posix()}") as f:
            f.write(p.read_bytes())


def _fingerprint(fs: pafs.FileSystem, root: str) -> tuple[str, list[pafs.FileInfo]]:
    files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    digest = hashlib.sha256()
    for info in sorted(files, key=lambda i: i.path):
        digest.update(f"{info.path[len(root) :]}\0{info.size}\n".encode())
    return digest.hexdigest()[:16], files


def default_cache_root() -> Path:
    """This node's cache folder: ``$DISTMAML_CACHE``, else ``~/.cache/distmaml``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distmaml").expanduser()


def cached_dir(path: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None) -> Path:
    """A local copy of a folder (a task store), downloaded once per node.

    Local paths are returned as they are. For a URI, the folder is copied to
    ``cache_root`` (default ``$DISTMAML_CACHE`` or ``~/.cache/distmaml``) under a
    name made of the URI and the names and sizes of its files, so a store
    rewritten in place is fetched again. The copy goes to a temporary folder
    first and is renamed into place, so workers that start together on one node
    never read a half-copied store: the first rename wins, the others use it.
    """
    loc = location(path)
    if isinstance(loc, Path):
        if not loc.is_dir():
            raise FileNotFoundError(f"{loc}: no such folder")
        return loc
    fs, root = resolve(loc)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{loc}: no such folder (or nothing under it)")
    key, files = _fingerprint(fs, root)
    base = Path(cache_root) if cache_root is not None else default_cache_root()
    target = base / f"{hashlib.sha256(loc.encode()).hexdigest()[:12]}-{name(loc)}-{key}"
    if target.is_dir():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        local = pafs.LocalFileSystem()
        for info in files:
            dest = tmp / info.path[len(root) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(dest), source_filesystem=fs, destination_filesystem=local)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # lost the race to another worker: use its copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
