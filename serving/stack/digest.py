"""The digest of a folder of files (adapters, models), as pinned by ``sha256`` in the spec.

Definition, shared with the shell side that verifies downloads on a host:

    for every regular file under the folder, the line ``<sha256 hex>  <relative posix path>\\n``
    (``sha256sum``'s format), lines sorted by relative path in byte order, concatenated;
    the digest is the sha256 hex of that text.

In shell: ``(cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -r -d '\\n'
sha256sum) | sha256sum``. Symlinks are refused, not followed: a link could point the digest
at a file outside the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

_CHUNK_BYTES = 1 << 20
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
DIGEST_ALLOWED = "64 lowercase hex digits (`python -m serving digest FOLDER`)"


def digest_problem(value: str) -> str:
    """Why ``value`` is not a folder digest as ``folder_digest`` prints it; empty when it is."""
    if DIGEST_RE.match(value):
        return ""
    shown = value if len(value) <= 80 else value[:77] + "..."
    return f"{shown!r} is not a sha256 digest ({len(value)} characters); allowed: {DIGEST_ALLOWED}"


class DigestError(ValueError):
    """The folder cannot be digested (a symlink, an unreadable entry, a strange name)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(path: Path) -> list[tuple[bytes, Path]]:
    """Regular files under ``path`` as (relative path in bytes, full path), in byte order.

    Raises DigestError on a symlink anywhere in the tree.
    """
    root = Path(path)
    if root.is_symlink():
        raise DigestError(f"{root} is a symlink; a digest follows no links")
    if not root.is_dir():
        raise DigestError(f"{root} is not a folder")
    found: list[tuple[bytes, Path]] = []

    def walk(folder: Path) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                full = Path(entry.path)
                if entry.is_symlink():
                    raise DigestError(f"{full} is a symlink; a digest follows no links")
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    walk(full)
                elif stat.S_ISREG(mode):
                    rel = full.relative_to(root).as_posix()
                    # sha256sum escapes such names with a leading backslash; refuse them instead.
                    if "\\" in rel or "\n" in rel or "\r" in rel:
                        raise DigestError(f"{full}: file names with \\ or line breaks are refused")
                    found.append((os.fsencode(rel), full))

    walk(root)
    found.sort(key=lambda item: item[0])
    return found


def folder_digest(path: Path) -> str:
    """sha256 hex of the ``sha256sum`` listing of every regular file under ``path``."""
    listing = hashlib.sha256()
    for rel, full in folder_files(path):
        listing.update(file_sha256(full).encode() + b"  " + rel + b"\n")
    return listing.hexdigest()
