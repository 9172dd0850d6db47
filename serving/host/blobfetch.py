"""Download a folder (all blobs under a prefix) from Azure Blob: parallel, resumable, verified.

Runs on the VM with the runtime venv's interpreter (fab deploy ships it), as
``python -m serving.host.blobfetch``. Credentials: the VM's user-assigned managed identity by
default (``--client-id``), or a connection string read from stdin (Azurite in the tests, or
an operator's SAS). A file already present with the blob's size and MD5 is kept, so a cut
download resumes where it stopped. Each downloaded file is checked against the blob's
Content-MD5 when the blob has one (azcopy and the upload helpers set it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

DEFAULT_WORKERS = 8
CHUNK_BYTES = 8 * 1024 * 1024
PARTIAL_SUFFIX = ".part"


class FetchError(Exception):
    pass


@dataclass(frozen=True)
class BlobSource:
    container: str
    prefix: str  # without trailing slash

    @classmethod
    def parse(cls, url: str) -> BlobSource:
        """``blob://container/some/prefix`` -> (container, prefix)."""
        if not url.startswith("blob://"):
            raise FetchError(f"{url!r} is not a blob:// source")
        container, _, prefix = url[len("blob://"):].partition("/")
        if not container or not prefix.strip("/"):
            raise FetchError(f"{url!r} needs a container and a path: blob://container/path")
        return cls(container, prefix.strip("/"))


def container_client(account_url: str, container: str, *, client_id: str = "",
                     connection_string: str = "") -> Any:
    from azure.storage.blob import ContainerClient

    if connection_string:
        return ContainerClient.from_connection_string(connection_string, container)
    from azure.identity import ManagedIdentityCredential

    # A user-assigned identity must be named; with several on a VM IMDS refuses to guess.
    credential = ManagedIdentityCredential(client_id=client_id or None)
    return ContainerClient(account_url, container, credential=credential)


def _md5_file(path: Path) -> bytes:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


def _is_complete(path: Path, size: int, md5: bytes | None) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    return md5 is None or _md5_file(path) == md5


def fetch(client: Any, source: BlobSource, dest: Path, *, workers: int = DEFAULT_WORKERS
          ) -> dict[str, Any]:
    """Mirror ``source`` into ``dest``; returns counts. Files not in the source are removed."""
    prefix = source.prefix + "/"
    blobs = [b for b in client.list_blobs(name_starts_with=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise FetchError(f"no blobs under {source.container}/{prefix}; check the source path")
    dest.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, Any] = {}
    for blob in blobs:
        rel = PurePosixPath(blob.name[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            raise FetchError(f"blob name {blob.name!r} escapes its folder")
        wanted[dest.joinpath(*rel.parts)] = blob

    def one(item: tuple[Path, Any]) -> tuple[bool, int]:
        path, blob = item
        md5 = blob.content_settings.content_md5
        md5 = bytes(md5) if md5 else None
        if _is_complete(path, blob.size, md5):
            return False, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + PARTIAL_SUFFIX)
        with part.open("wb") as handle:
            client.download_blob(blob.name, max_concurrency=2).readinto(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if part.stat().st_size != blob.size:
            raise FetchError(f"{blob.name}: got {part.stat().st_size} bytes, blob has {blob.size}")
        if md5 is not None and _md5_file(part) != md5:
            raise FetchError(f"{blob.name}: MD5 differs from the blob's Content-MD5 "
                             f"({base64.b64encode(md5).decode()})")
        os.replace(part, path)
        return True, blob.size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, wanted.items()))
    removed = 0
    for path in sorted(dest.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()
            removed += 1
    return {"files": len(wanted), "downloaded": sum(1 for d, _ in results if d),
            "bytes": sum(n for _, n in results), "removed": removed}


def mirror(url: str, dest: Path, *, account_url: str = "", client_id: str = "",
           connection_string: str = "", workers: int = DEFAULT_WORKERS) -> dict[str, Any]:
    """Mirror ``blob://container/prefix`` into ``dest``; every failure, Azure's and the
    network's included, is a FetchError naming the container."""
    source = BlobSource.parse(url)
    if not (account_url or connection_string):
        raise FetchError(f"{url}: no Blob account URL or connection string was given")
    try:
        client = container_client(account_url, source.container, client_id=client_id,
                                  connection_string=connection_string)
        return fetch(client, source, dest, workers=workers)
    except FetchError:
        raise
    except Exception as exc:  # azure.core.exceptions.AzureError, network errors
        raise FetchError(f"Blob {source.container}: {type(exc).__name__}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.host.blobfetch", description=__doc__)
    p.add_argument("source", help="blob://container/prefix")
    p.add_argument("dest", help="local folder to mirror into")
    p.add_argument("--account-url", default="")
    p.add_argument("--client-id", default="")
    p.add_argument("--connection-string-stdin", action="store_true")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = p.parse_args(argv)
    conn = sys.stdin.readline().strip() if args.connection_string_stdin else ""
    try:
        counts = mirror(args.source, Path(args.dest), account_url=args.account_url,
                        client_id=args.client_id, connection_string=conn, workers=args.workers)
    except FetchError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
