"""The registry side of the model and adapter supply chain: folders into the stack's Blob storage.

A folder goes to ``blob://container/prefix`` as one blob per file at ``prefix/<relative path>``,
the layout hosts and pods mirror from (``serving.host.blobfetch``, ``k8s/scripts``). Each blob
carries its Content-MD5 (blobfetch verifies downloads against it) and its file's sha256 as
metadata, so the folder digest (``serving.stack.digest``) can be recomputed from a listing
alone: preflight checks an adapter version's ``sha256`` without downloading it.

Adapter versions are immutable (vLLM keys its prefix cache by path): a version already in Blob
with another digest is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.stack.digest import file_sha256, folder_files

# Blob metadata key holding the file's sha256 hex (metadata names are C# identifiers).
SHA256_METADATA = "sha256"
_CHUNK_BYTES = 1 << 20


class BlobStoreError(Exception):
    """Blob answered something other than what the upload or check needs."""


@dataclass(frozen=True)
class BlobFolder:
    container: str
    prefix: str  # without slashes at either end

    @classmethod
    def parse(cls, url: str) -> BlobFolder:
        container, _, prefix = url.removeprefix("blob://").partition("/")
        return cls(container, prefix.strip("/"))

    def __str__(self) -> str:
        return f"blob://{self.container}/{self.prefix}"


@dataclass(frozen=True)
class Listed:
    """What a listing says of a folder: file -> (size, sha256 or "") and the digest if every
    blob carries its sha256."""

    files: dict[str, tuple[int, str]]

    @property
    def digest(self) -> str | None:
        if not self.files or any(not sha for _, sha in self.files.values()):
            return None
        listing = hashlib.sha256()
        for rel in sorted(self.files, key=lambda r: r.encode()):
            listing.update(f"{self.files[rel][1]}  {rel}\n".encode())
        return listing.hexdigest()


def list_folder(service: Any, folder: BlobFolder) -> Listed:
    """The blobs under ``folder`` (a ``BlobServiceClient``); empty when there are none or the
    container does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    box = service.get_container_client(folder.container)
    start = folder.prefix + "/"
    files: dict[str, tuple[int, str]] = {}
    try:
        for blob in box.list_blobs(name_starts_with=start, include=["metadata"]):
            if blob.name.endswith("/"):
                continue
            sha = (blob.metadata or {}).get(SHA256_METADATA, "")
            files[blob.name[len(start):]] = (int(blob.size), sha)
    except ResourceNotFoundError:
        return Listed({})
    return Listed(files)


def _md5(path: Path) -> bytes:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


@dataclass(frozen=True)
class Uploaded:
    folder: BlobFolder
    digest: str
    files: int
    uploaded: int
    bytes: int


def upload_folder(service: Any, source: Path, folder: BlobFolder, *, immutable: bool,
                  say: Callable[[str], None] = lambda _: None) -> Uploaded:
    """Put every file of ``source`` under ``folder``; files already there with the same sha256
    are kept, so a cut upload resumes. With ``immutable``, a folder already holding another
    digest is refused before anything is written."""
    from azure.storage.blob import ContentSettings

    local = [(rel.decode(), full) for rel, full in folder_files(source)]
    shas = {rel: file_sha256(full) for rel, full in local}
    digest = Listed({rel: (0, sha) for rel, sha in shas.items()}).digest or ""
    present = list_folder(service, folder)
    if immutable and present.files and present.digest != digest:
        raise BlobStoreError(
            f"{folder} already holds another folder (digest {present.digest or 'unknown'}, "
            f"this one {digest}); versions are immutable: upload it as a new version")
    box = service.get_container_client(folder.container)
    if not box.exists():
        box.create_container()
    uploaded = sent = 0
    for rel, full in local:
        if present.files.get(rel, (None, ""))[1] == shas[rel]:
            continue
        settings = ContentSettings(content_type="application/octet-stream",
                                   content_md5=bytearray(_md5(full)))
        with full.open("rb") as data:
            box.upload_blob(f"{folder.prefix}/{rel}", data, overwrite=True,
                            content_settings=settings, metadata={SHA256_METADATA: shas[rel]})
        uploaded += 1
        sent += full.stat().st_size
        say(f"{folder}/{rel}")
    stale = sorted(set(present.files) - set(shas))
    for rel in stale:
        box.delete_blob(f"{folder.prefix}/{rel}")
    return Uploaded(folder, digest, len(local), uploaded, sent)
