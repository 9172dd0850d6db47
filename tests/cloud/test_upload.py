"""Tier 3: `python -m serving upload` against Azurite's Blob API, read back by the hosts' own
fetch (``serving.host.blobfetch``) and by preflight's listing digest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from azurite import Azurite, start_azurite

from serving import cli
from serving.cloud import blobstore
from serving.host import blobfetch
from serving.stack import stackfile
from serving.stack.digest import folder_digest

pytestmark = pytest.mark.integration
CONN_ENV = "EXAONE_TEST_BLOB_CONNECTION"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with start_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture()
def work(tmp_path: Path, azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv(CONN_ENV, azurite.connection_string)
    for container in ("models", "adapters"):
        azurite.delete_prefix(container, "")
    model = _folder(tmp_path / "model", {"config.json": b'{"model_type": "exaone"}',
                                         "model-00001.safetensors": b"\0" * 300_000,
                                         "tokenizer/tokenizer.json": b"{}"})
    support = _folder(tmp_path / "support", {"adapter_config.json": b'{"r": 16}',
                                             "adapter_model.safetensors": b"\1" * 4096})
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    config = document["config"]
    config["exaone-serving:adapters"][0]["sha256"] = folder_digest(support)
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    return {"model": model, "support": support, "config": path}


def _upload(work: dict[str, Path], *args: str) -> int:
    return cli.main(["upload", "--config", str(work["config"]),
                     "--connection-string-env", CONN_ENV, *args])


def test_upload_puts_folders_where_hosts_fetch_them(work: dict[str, Path], azurite: Azurite,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _upload(work, "--model", str(work["model"]),
                   "--adapter", f"support-ko=3:{work['support']}") == 0
    out = capsys.readouterr().out
    assert f"digest {folder_digest(work['model'])}" in out
    assert f"digest {folder_digest(work['support'])}" in out
    # The host side mirrors the same prefixes, verifying each blob's Content-MD5.
    for source, original in (("blob://models/exaone-3.5-2.4b-instruct", work["model"]),
                             ("blob://adapters/support-ko/3", work["support"])):
        dest = tmp_path / "fetched" / source.rsplit("/", 1)[-1]
        counts = blobfetch.mirror(source, dest, connection_string=azurite.connection_string)
        assert counts["files"] == len(list(p for p in original.rglob("*") if p.is_file()))
        assert folder_digest(dest) == folder_digest(original)
    # Preflight's check: the digest from the listing alone equals the pinned one.
    listed = blobstore.list_folder(azurite.client(),
                                   blobstore.BlobFolder.parse("blob://adapters/support-ko/3"))
    assert listed.digest == folder_digest(work["support"])


def test_a_second_upload_sends_nothing(work: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--adapter", f"support-ko=3:{work['support']}")
    assert _upload(work, *args) == 0
    capsys.readouterr()
    assert _upload(work, *args) == 0
    assert "0 uploaded" in capsys.readouterr().out


def test_an_uploaded_version_is_never_overwritten(work: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _upload(work, "--adapter", f"support-ko=3:{work['support']}") == 0
    capsys.readouterr()
    # Same version, another folder whose digest the stack is changed to pin.
    other = _folder(tmp_path / "other", {"adapter_config.json": b'{"r": 8}'})
    document = yaml.safe_load(work["config"].read_text())
    document["config"]["exaone-serving:adapters"][0]["sha256"] = folder_digest(other)
    work["config"].write_text(yaml.safe_dump(document))
    assert _upload(work, "--adapter", f"support-ko=3:{other}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "immutable" in err[0] and "Traceback" not in err[0]


def test_a_folder_the_stack_does_not_pin_is_refused_before_any_upload(
        work: dict[str, Path], azurite: Azurite, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = _folder(tmp_path / "other", {"adapter_config.json": b'{"r": 8}'})
    assert _upload(work, "--model", str(work["model"]),
                   "--adapter", f"support-ko=3:{other}") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "adapters[0].sha256" in line and folder_digest(other) in line
    box = azurite.client().get_container_client("models")
    assert not box.exists() or list(box.list_blobs()) == [], "uploaded before refusing"
    assert azurite.connection_string not in line
