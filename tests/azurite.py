"""Azurite's Blob service on a free local port, for tests of what reads and writes Blob storage.

`make tools` (.ci/tools.sh) installs the pinned npm package into .venv-tools/node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mimetypes
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
from azure.storage.blob import BlobServiceClient, ContentSettings
from local_server import free_port

REPO = Path(__file__).resolve().parent.parent
AZURITE_VERSION = "3.37.0"
AZURITE_BIN = REPO / ".venv-tools" / "node" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_BIN_ENV = "AZURITE_BLOB"
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10

# The emulator's fixed, publicly documented development account.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def azurite_binary() -> Path:
    """The azurite-blob launcher: $AZURITE_BLOB, .venv-tools/node, then PATH."""
    override = os.environ.get(AZURITE_BIN_ENV)
    if override:
        return Path(override)
    if AZURITE_BIN.is_file():
        return AZURITE_BIN
    found = shutil.which("azurite-blob")
    if found is None:
        pytest.fail(f"azurite-blob is missing ({AZURITE_BIN}): `make tools` installs "
                    f"azurite@{AZURITE_VERSION} there")
    return Path(found)


@dataclasses.dataclass
class Azurite:
    port: int
    workdir: Path
    log_file: Path
    host: str = "127.0.0.1"
    _process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)

    @property
    def account_url(self) -> str:
        return f"http://{self.host}:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};"
                f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.account_url};")

    def client(self) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.connection_string)

    def upload_folder(self, container: str, prefix: str, folder: Path) -> list[str]:
        """Upload every file under ``folder`` as ``prefix/relative/path``, as azcopy would:
        Content-MD5 and a content type set on each blob. Creates the container if missing."""
        service = self.client()
        box = service.get_container_client(container)
        if not box.exists():
            box.create_container()
        names = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = _join(prefix, path.relative_to(folder).as_posix())
            data = path.read_bytes()
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            settings = ContentSettings(content_type=content_type,
                                       content_md5=bytearray(hashlib.md5(data).digest()))
            box.upload_blob(name, data, overwrite=True, content_settings=settings)
            names.append(name)
        return names

    def delete_prefix(self, container: str, prefix: str) -> int:
        """Delete the blobs under the folder ``prefix`` (all of them for ""); returns how many."""
        box = self.client().get_container_client(container)
        if not box.exists():
            return 0
        folder = _join(prefix, "")
        names = [b.name for b in box.list_blobs(name_starts_with=folder or None)]
        for name in names:
            box.delete_blob(name)
        return len(names)

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Azurite:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_azurite(workdir: Path, *, host: str = "127.0.0.1") -> Azurite:
    """Start azurite-blob (in-memory) on a free port of ``host`` and wait until it answers
    (another address of this machine for test hosts in their own network namespace)."""
    binary = azurite_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = workdir / "azurite.log"
    # No --location: Azurite 3.37 exits with "The --inMemoryPersistence option is not
    # supported when the --location option is set."
    command = [str(binary), "--blobHost", host, "--blobPort", str(port),
               "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry",
               "--loose"]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    azurite = Azurite(port=port, workdir=workdir, log_file=log_file, host=host,
                      _process=process)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not _answers(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            azurite.stop()
            log = log_file.read_text(errors="replace")[-4000:]
            state = (f"exited with {process.returncode}" if process.poll() is not None
                     else f"did not answer within {START_TIMEOUT_SECONDS} s")
            pytest.fail(f"azurite-blob on port {port} {state}:\n{log}")
        time.sleep(0.1)
    return azurite


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 1) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return sock.recv(12).startswith(b"HTTP/1.1")
    return False


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name
