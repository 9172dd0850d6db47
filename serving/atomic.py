"""Put a whole file or folder in place at once: readers see the old one or the new one,
never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_folder(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Build ``dest`` by calling ``fill`` on a staging folder beside it, then rename it in.

    An existing ``dest`` is replaced; on any failure the staging folder is removed and
    ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the serving user reads it
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it, given ``mode`` before any
    byte is written (secrets are never readable by others), fsynced, then renamed over
    ``path`` (a symlink is replaced, not written through), and the rename made durable."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
