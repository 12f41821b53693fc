"""From a config's ``data`` section to a store and its ``ImageTasks``.

``data.family``:

* ``store``: any store that ``distmaml prepare`` wrote, at ``data.path``.
* ``glyphs``: the procedural glyph set with its default ``GlyphSpec``, at
  ``data.path`` or, when unset, in the cache folder
  (``$DISTMAML_CACHE`` or ``~/.cache/distmaml``); generated on first use,
  atomically, so concurrent workers cannot see half a store.
"""

from __future__ import annotations

from pathlib import Path

from distmaml import storage
from distmaml.config import IMAGE_FAMILIES, Config
from distmaml.data.errors import DataError
from distmaml.data.store import StoreInfo, is_store, open_store, prepare_command


def default_glyphs_path() -> Path:
    from distmaml.data.glyphs import GENERATOR_VERSION

    return storage.default_cache_root() / f"glyphs-v{GENERATOR_VERSION}"


def store_path(config: Config) -> Path:
    """The store folder of an image family; the glyph store is generated here if missing."""
    data = config.data
    if data.path and storage.is_uri(data.path) and data.family in IMAGE_FAMILIES:
        try:  # a store on S3 or GCS: copied once per node into the cache folder
            return storage.cached_dir(data.path)
        except FileNotFoundError:
            raise DataError(
                f"data.path = {data.path}: no task store there; create one with {prepare_command(data.path)}"
            ) from None
    if data.family == "glyphs":
        path = Path(data.path).expanduser() if data.path else default_glyphs_path()
        if not is_store(path):
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise DataError(
                    f"data.path = {str(path)!r} holds other files, not a task store; point data.path at an "
                    "empty or new folder for the glyph set (or unset it to use the cache)"
                )
            from distmaml.data.glyphs import prepare_glyphs

            prepare_glyphs(path, keep_existing=True)
        return path
    if data.family == "store":
        if not data.path:
            raise DataError(
                f"data.path is not set: prepare a store with {prepare_command('DATA_DIR')}, then "
                "--set data.path=DATA_DIR"
            )
        path = Path(data.path).expanduser()
        if not is_store(path):
            what = "no such folder" if not path.exists() else "not a task store (no metadata.json)"
            raise DataError(
                f"data.path = {data.path!r}: {what}; prepare one there with {prepare_command(data.path)} "
                "or --set data.path=DATA_DIR"
            )
        return path
    raise DataError(f"data.family = {data.family!r} has no task store (stores: glyphs, store)")


def open_config_store(config: Config) -> StoreInfo:
    """The metadata of the config's store; a bad store is reported against ``data.path``."""
    path = store_path(config)
    try:
        return open_store(path)
    except DataError as e:
        raise DataError(f"data.path = {str(path)!r}: {e}") from None


def image_shape(config: Config) -> tuple[int, int, int]:
    """(channels, height, width) of the config's store, from its metadata alone."""
    return open_config_store(config).image_shape


def build_image_family(config: Config):  # type: ignore[no-untyped-def]
    """The config's ``ImageTasks``; checks ways, shots and queries against the store."""
    from distmaml.data.episodes import ImageTasks

    d = config.data
    info = open_config_store(config)
    return ImageTasks(info.path, ways=d.ways, shots=d.shots, queries=d.queries, seed=config.seed)
