"""The project as a user has it (a fresh clone) and as ``ray up``'s ``file_mounts`` put it on a node."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def fresh_clone(dest: Path) -> Path:
    """``git clone`` of this repository's committed state into ``dest``."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, capture_output=True, timeout=120)
    return dest


def tracked_files() -> list[str]:
    """The files a clone has, as they are in this working tree (uncommitted edits included)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, timeout=60).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether rsync's ``--exclude PATTERN`` (as ``rsync_exclude`` passes them) leaves ``path`` out."""
    parts = path.split("/")
    for pattern in patterns:
        name = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(part, name) for part in parts):
            return True
    return False


def mounted_project(dest: Path, cluster_file: str = "cluster/config.yaml") -> Path:
    """The project as ``file_mounts: ~/distmaml: .`` copies a fresh clone to a node, minus ``rsync_exclude``."""
    config = yaml.safe_load((ROOT / cluster_file).read_text())
    assert config["file_mounts"].get("~/distmaml") == "."
    patterns = list(config.get("rsync_exclude") or [])
    for rel in tracked_files():
        if excluded(rel, patterns):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest
