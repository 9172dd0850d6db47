"""Put a whole folder in place at once: readers see the old folder or the new one, never half."""

from __future__ import annotations

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
