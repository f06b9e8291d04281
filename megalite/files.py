"""Durable writes: a file replaced whole or not at all, and the folder entry that names it on disk.

The one rule for every file megalite commits (checkpoint metadata, manifests, shard indexes,
writer positions): write under a temporary name, fsync the file, rename it over the target, fsync
the folder. A crash at any point leaves the old file or the new one, never a part; after the
return, a power cut keeps the new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (text is written as UTF-8), durably; see the module docstring."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
