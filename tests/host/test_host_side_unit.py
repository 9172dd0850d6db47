"""Tier 1: the host-side tools fab deploy ships to a VM (serving.host.blobfetch, serving.host.files,
serving.host.adapters, serving.host.model), run here against temporary folders and a fake
Blob container, with the VM layout moved under tmp_path."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import json
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from serving.adapters.record import Record, RecordStore, Served
from serving.host import adapters as host_adapters
from serving.host import files as hostfiles
from serving.host import model as host_model
from serving.host.blobfetch import PARTIAL_SUFFIX, BlobSource, FetchError, fetch
from serving.host.common import HostError
from serving.stack import layout as layouts
from serving.stack import stackfile
from serving.stack.digest import folder_digest
from serving.stack.spec import Spec

# --- a fake Blob container ----------------------------------------------------------------------


def md5(data: bytes) -> bytearray:
    return bytearray(hashlib.md5(data, usedforsecurity=False).digest())


class FakeContainer:
    """What blobfetch uses of azure.storage.blob.ContainerClient: list_blobs, download_blob.

    ``blobs`` maps names to content; ``md5s`` overrides a blob's Content-MD5 (None: unset);
    ``served`` overrides what a download returns (a corrupt transfer).
    """

    def __init__(self, blobs: dict[str, bytes], *, md5s: dict[str, bytearray | None] | None = None,
                 served: dict[str, bytes] | None = None):
        self.blobs = blobs
        self.md5s = md5s or {}
        self.served = served or {}
        self.downloads: list[str] = []
        self.lock = threading.Lock()

    def list_blobs(self, name_starts_with: str = "") -> list[Any]:
        return [SimpleNamespace(
            name=name, size=len(data),
            content_settings=SimpleNamespace(content_md5=self.md5s.get(name, md5(data))))
            for name, data in sorted(self.blobs.items()) if name.startswith(name_starts_with)]

    def download_blob(self, name: str, max_concurrency: int = 1) -> Any:
        with self.lock:
            self.downloads.append(name)
        data = self.served.get(name, self.blobs[name])
        return SimpleNamespace(readinto=lambda handle: handle.write(data))


MODEL = {
    "models/m/rev/config.json": b'{"model_type": "exaone"}',
    "models/m/rev/model.safetensors": b"\x00" * 4096,
    "models/m/rev/sub/tokenizer.json": b'{"v": 1}',
    "models/m/rev/": b"",  # a folder marker some tools create: not a file
    "models/m/other/x.bin": b"not under the prefix",
}
SOURCE = BlobSource.parse("blob://models-container/models/m/rev")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


WANT_TREE = {"config.json": MODEL["models/m/rev/config.json"],
             "model.safetensors": MODEL["models/m/rev/model.safetensors"],
             "sub/tokenizer.json": MODEL["models/m/rev/sub/tokenizer.json"]}


@pytest.mark.parametrize(("url", "want"), [
    pytest.param("blob://models/exaone/rev/", ("models", "exaone/rev"), id="trailing-slash"),
    pytest.param("blob://adapters/a/1", ("adapters", "a/1"), id="nested"),
])
def test_blob_source_parse(url: str, want: tuple[str, str]) -> None:
    source = BlobSource.parse(url)
    assert (source.container, source.prefix) == want


@pytest.mark.parametrize("url", [
    pytest.param("https://acct.blob.core.windows.net/models/x", id="not-blob-scheme"),
    pytest.param("blob://models", id="no-path"),
    pytest.param("blob://models/", id="empty-path"),
    pytest.param("blob:///x", id="no-container"),
])
def test_blob_source_parse_rejects(url: str) -> None:
    with pytest.raises(FetchError):
        BlobSource.parse(url)


def test_fetch_downloads_the_prefix_only(tmp_path: Path) -> None:
    client = FakeContainer(dict(MODEL))
    dest = tmp_path / "model.partial"
    counts = fetch(client, SOURCE, dest, workers=2)
    assert tree(dest) == WANT_TREE
    assert counts == {"files": 3, "downloaded": 3, "removed": 0,
                      "bytes": sum(len(v) for v in WANT_TREE.values())}
    assert sorted(client.downloads) == sorted(f"models/m/rev/{k}" for k in WANT_TREE)
    assert not list(dest.rglob(f"*{PARTIAL_SUFFIX}"))


def test_fetch_resumes_keeping_complete_files(tmp_path: Path) -> None:
    dest = tmp_path / "model.partial"
    (dest / "sub").mkdir(parents=True)
    (dest / "config.json").write_bytes(WANT_TREE["config.json"])  # complete, MD5 matches
    (dest / "model.safetensors").write_bytes(b"\x00" * 100)  # cut short
    (dest / "sub" / "tokenizer.json").write_bytes(b'{"v": 2}')  # same size, other content
    client = FakeContainer(dict(MODEL))
    counts = fetch(client, SOURCE, dest, workers=1)
    assert sorted(client.downloads) == ["models/m/rev/model.safetensors",
                                        "models/m/rev/sub/tokenizer.json"]
    assert counts["downloaded"] == 2 and counts["files"] == 3
    assert tree(dest) == WANT_TREE
    # A second run finds everything complete and downloads nothing.
    again = FakeContainer(dict(MODEL))
    assert fetch(again, SOURCE, dest)["downloaded"] == 0 and again.downloads == []


def test_fetch_without_content_md5_trusts_a_file_of_the_right_size(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "config.json").write_bytes(b"X" * len(WANT_TREE["config.json"]))
    client = FakeContainer(dict(MODEL), md5s={"models/m/rev/config.json": None})
    fetch(client, SOURCE, dest)
    assert "models/m/rev/config.json" not in client.downloads
    assert (dest / "config.json").read_bytes().startswith(b"XXX")


def test_fetch_md5_mismatch_raises_and_leaves_no_file(tmp_path: Path) -> None:
    corrupt = b"\x01" + MODEL["models/m/rev/model.safetensors"][1:]  # same size, bad bytes
    client = FakeContainer(dict(MODEL), served={"models/m/rev/model.safetensors": corrupt})
    dest = tmp_path / "d"
    with pytest.raises(FetchError, match=r"model\.safetensors: MD5 differs") as err:
        fetch(client, SOURCE, dest)
    want = base64.b64encode(md5(MODEL["models/m/rev/model.safetensors"])).decode()
    assert want in str(err.value)
    assert not (dest / "model.safetensors").exists()


def test_fetch_short_download_raises(tmp_path: Path) -> None:
    client = FakeContainer(dict(MODEL), served={"models/m/rev/config.json": b"{}"})
    with pytest.raises(FetchError, match=r"config.json: got 2 bytes, blob has \d+"):
        fetch(client, SOURCE, tmp_path / "d")


@pytest.mark.parametrize("name", [
    pytest.param("models/m/rev/../escape.txt", id="dot-dot"),
    pytest.param("models/m/rev/sub/../../../escape.txt", id="nested-dot-dot"),
    pytest.param("models/m/rev//etc/passwd", id="absolute"),
])
def test_fetch_refuses_names_escaping_the_folder(tmp_path: Path, name: str) -> None:
    client = FakeContainer({**MODEL, name: b"evil"})
    dest = tmp_path / "a" / "d"
    with pytest.raises(FetchError, match="escapes its folder"):
        fetch(client, SOURCE, dest)
    assert client.downloads == []  # checked before anything is downloaded
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_fetch_removes_files_not_in_the_source(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    (dest / "sub").mkdir(parents=True)
    (dest / "stale.bin").write_bytes(b"old weights")
    (dest / "sub" / "gone.json").write_bytes(b"{}")
    (dest / "sub" / f"tokenizer.json{PARTIAL_SUFFIX}").write_bytes(b"cut")  # replaced, not left
    counts = fetch(FakeContainer(dict(MODEL)), SOURCE, dest)
    assert counts["removed"] == 2
    assert tree(dest) == WANT_TREE


def test_fetch_with_no_blobs_under_the_prefix_raises(tmp_path: Path) -> None:
    client = FakeContainer({"models/m/other/x.bin": b"x", "models/m/rev/": b""})
    with pytest.raises(FetchError, match="no blobs under models-container/models/m/rev/"):
        fetch(client, SOURCE, tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- hostfiles ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_hostfiles_put_writes_atomically_with_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "exaone" / "api-key"
    assert hostfiles.digest(path) is None
    assert hostfiles.put(path, b"key-1\n", 0o600) is True
    assert path.read_bytes() == b"key-1\n" and _mode(path) == 0o600
    assert hostfiles.digest(path) == hashlib.sha256(b"key-1\n").hexdigest()
    inode = path.stat().st_ino
    # The same content and mode: nothing is written (the file is the same inode).
    assert hostfiles.put(path, b"key-1\n", 0o600) is False
    assert path.stat().st_ino == inode
    # New content replaces the file by rename: a reader holding the old file sees it whole.
    old = tmp_path / "old-link"
    old.hardlink_to(path)
    assert hostfiles.put(path, b"key-2\n", 0o600) is True
    assert path.read_bytes() == b"key-2\n" and old.read_bytes() == b"key-1\n"
    # Only the mode differs: rewritten with the right mode.
    assert hostfiles.put(path, b"key-2\n", 0o644) is True and _mode(path) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["api-key"]  # no temp files left


def test_hostfiles_put_mode_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        hostfiles.put(tmp_path / "unit", b"[Unit]\n", 0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "unit") == 0o644


def test_hostfiles_main_probe_and_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"secret\n")))
    assert hostfiles.main(["put", str(path), "--mode", "600"]) == 0
    assert json.loads(capsys.readouterr().out) == {"changed": True}
    assert path.read_bytes() == b"secret\n" and _mode(path) == 0o600
    assert hostfiles.main(["probe", str(path), str(tmp_path / "missing")]) == 0
    assert json.loads(capsys.readouterr().out) == {
        str(path): hashlib.sha256(b"secret\n").hexdigest(), str(tmp_path / "missing"): None}


# --- the VM layout under tmp_path ---------------------------------------------------------------


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> layouts.Layout:
    """layouts.VM with its state under tmp_path; the host-side modules read layouts.VM at
    call time (``from serving import layout as layouts``), so patching the module suffices."""
    moved = dataclasses.replace(layouts.VM, state_dir=str(tmp_path / "state"))
    monkeypatch.setattr(layouts, "VM", moved)
    return moved


def dev_values(**overrides: Any) -> dict[str, Any]:
    ns = stackfile.namespace() + ":"
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    return {**{k[len(ns):]: v for k, v in document["config"].items()}, **overrides}


def adapter(name: str, version: str, sha256: str, rank: int = 8) -> dict[str, Any]:
    return {"name": name, "version": version, "source": f"blob://adapters/{name}/{version}",
            "sha256": sha256, "rank": rank}


def spec_with_adapters(*adapters: dict[str, Any]) -> Spec:
    return stackfile.from_values(dev_values(adapters=list(adapters)), stack="dev")


def make_version(vm: layouts.Layout, name: str, version: str, content: bytes = b"w") -> Path:
    folder = Path(vm.adapters_dir, name, version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": version}))
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder


# --- host_adapters ------------------------------------------------------------------------------


def test_adapters_probe_states(vm: layouts.Layout) -> None:
    good = make_version(vm, "a", "1")
    make_version(vm, "b", "1", content=b"tampered")
    spec = spec_with_adapters(adapter("a", "1", folder_digest(good)),
                              adapter("b", "1", folder_digest(good)),
                              adapter("c", "1", folder_digest(good)))
    assert host_adapters.probe(spec) == {"adapters": {"a/1": "present", "b/1": "changed",
                                                      "c/1": "missing"}}


def test_record_plan_removes_names_that_left_and_keeps_history(vm: layouts.Layout) -> None:
    root = Path(vm.adapters_dir)
    digest = "ab" * 32
    for name, version in [("keep", "1"), ("keep", "2"), ("keep", "3"), ("keep", "9"),
                          ("new", "1"), ("gone", "1")]:
        make_version(vm, name, version)
    (root / host_adapters.STAGING / "keep--4").mkdir(parents=True)
    store = RecordStore(vm.state_dir)
    record = Record().set_current("keep", Served("1", str(root / "keep" / "1")), op="add")
    record = record.set_current("keep", Served("2", str(root / "keep" / "2")), op="hotfix")
    record = record.set_current("gone", Served("1", str(root / "gone" / "1")), op="add")
    record = store.save(record)
    spec = spec_with_adapters(adapter("keep", "3", digest), adapter("new", "1", digest))

    planned = host_adapters.record(spec, dry=True)
    # gone/1 was serving: vLLM may still read it (loaded at runtime, or in place), so this
    # rollout keeps its folder and the next one removes it.
    kept_gone = (f"kept {root / 'gone' / '1'}: vLLM may still read it (the record had it "
                 "serving); the next rollout removes it")
    assert planned == {
        "changes": ["record keep/3 as serving", "record new/1 as serving",
                    "record gone as removed", f"create {vm.resolver_dir}",
                    "resolver entry keep -> 3", "resolver entry new -> 1", kept_gone],
        "remove": [str(root / "keep" / "9")],
        "applied": False,
    }
    assert store.load() == record  # dry: nothing written
    assert (root / "gone").is_dir()

    done = host_adapters.record(spec, dry=False)
    assert done["applied"] is True and done["changes"] == planned["changes"]
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/*")) == [
        ".staging/keep--4", "gone/1", "keep/1", "keep/2", "keep/3", "new/1"]
    after = store.load()
    assert after.serial == record.serial + 1
    keep = after.entries["keep"]
    assert keep.current.version == "3" and keep.current.path == str(root / "keep" / "3")
    assert keep.current.sha256 == digest
    assert [h.version for h in keep.history] == ["1", "2"]
    assert after.entries["new"].current.version == "1"
    assert after.entries["gone"].current is None
    assert [h.version for h in after.entries["gone"].history] == ["1"]
    assert [(e["op"], e["name"]) for e in after.log[-3:]] == [
        ("deploy", "keep"), ("deploy", "new"), ("remove", "gone")]
    # vLLM's resolver folder follows the record: the names serving, nothing else.
    resolver = Path(vm.resolver_dir)
    assert sorted(p.name for p in resolver.iterdir()) == [".entries", "keep", "new"]
    assert (resolver / "keep" / "adapter_model.safetensors").resolve() == \
        root / "keep" / "3" / "adapter_model.safetensors"
    assert json.loads((resolver / "new" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == vm.model_path(spec)

    # The next run removes what the record no longer serves; then nothing is left to do.
    assert host_adapters.record(spec, dry=False) == {"changes": [], "remove": [
        str(root / "gone")], "applied": True}
    assert not (root / "gone").exists()
    assert host_adapters.record(spec, dry=False) == {"changes": [], "remove": [],
                                                     "applied": False}
    assert store.load().serial == after.serial


def test_record_on_a_damaged_record_says_what_to_run(vm: layouts.Layout) -> None:
    make_version(vm, "a", "1")
    Path(vm.state_dir, "adapters.json").write_text("{")
    spec = spec_with_adapters(adapter("a", "1", "ab" * 32))
    with pytest.raises(HostError, match=r"adapters reconcile --rebuild.*then deploy again"):
        host_adapters.record(spec, dry=False)
    assert Path(vm.state_dir, "adapters.json").read_text() == "{"


def test_record_on_a_fresh_host_records_the_set(vm: layouts.Layout) -> None:
    make_version(vm, "a", "1")
    spec = spec_with_adapters(adapter("a", "1", "cd" * 32))
    assert host_adapters.record(spec, dry=True)["changes"] == [
        "record a/1 as serving", f"create {vm.resolver_dir}", "resolver entry a -> 1"]
    host_adapters.record(spec, dry=False)
    assert RecordStore(vm.state_dir).load().serving()["a"].version == "1"


def test_record_records_a_new_pin_for_the_same_version(vm: layouts.Layout) -> None:
    make_version(vm, "a", "1")
    host_adapters.record(spec_with_adapters(adapter("a", "1", "cd" * 32)), dry=False)
    repinned = spec_with_adapters(adapter("a", "1", "ef" * 32))
    assert host_adapters.record(repinned, dry=True)["changes"] == ["record a/1 as serving"]
    host_adapters.record(repinned, dry=False)
    assert RecordStore(vm.state_dir).load().serving()["a"].sha256 == "ef" * 32


# --- host_model ---------------------------------------------------------------------------------

DEV_SPEC = stackfile.load(stack="dev")


def _model_folder(vm: layouts.Layout, spec: Spec = DEV_SPEC, **marker: Any) -> Path:
    folder = Path(vm.model_path(spec))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "exaone"}')
    (folder / "modeling_exaone.py").write_text("import x\n")
    files = {"config.json": 24, "modeling_exaone.py": 9}
    doc = {"source": spec.model.source, "revision": spec.model.revision, "files": files}
    (folder / host_model.MARKER).write_text(json.dumps({**doc, **marker}))
    return folder


def test_host_model_probe_present(vm: layouts.Layout) -> None:
    folder = _model_folder(vm)
    assert host_model.probe(DEV_SPEC) == {"state": "present", "path": str(folder), "files": 2}


def test_host_model_probe_patched_file_checks_its_original(vm: layouts.Layout) -> None:
    folder = _model_folder(vm)
    (folder / "modeling_exaone.py.orig").write_bytes((folder / "modeling_exaone.py").read_bytes())
    (folder / "modeling_exaone.py").write_text("import patched_longer_now\n")
    assert host_model.probe(DEV_SPEC)["state"] == "present"


@pytest.mark.parametrize(("partial", "want"), [
    pytest.param(False, False, id="nothing"),
    pytest.param(True, True, id="partial-download"),
])
def test_host_model_probe_missing(vm: layouts.Layout, partial: bool, want: bool) -> None:
    folder = Path(vm.model_path(DEV_SPEC))
    if partial:
        folder.with_name(folder.name + ".partial").mkdir(parents=True)
    assert host_model.probe(DEV_SPEC) == {"state": "missing", "path": str(folder),
                                          "partial": want}


@pytest.mark.parametrize(("change", "detail"), [
    pytest.param("revision", "another source or revision", id="other-revision"),
    pytest.param("size", "config.json missing or changed", id="file-changed"),
    pytest.param("delete", "modeling_exaone.py missing or changed", id="file-missing"),
    pytest.param("marker", "marker unreadable", id="marker-corrupt"),
])
def test_host_model_probe_stale(vm: layouts.Layout, change: str, detail: str) -> None:
    folder = _model_folder(vm, **({"revision": "0" * 40} if change == "revision" else {}))
    if change == "size":
        (folder / "config.json").write_text('{"model_type": "exaone", "x": 1}')
    elif change == "delete":
        (folder / "modeling_exaone.py").unlink()
    elif change == "marker":
        (folder / host_model.MARKER).write_text("{not json")
    state = host_model.probe(DEV_SPEC)
    assert state["state"] == "stale" and detail in state["detail"]


# --- health gate: the API proxy ----------------------------------------------------------------


class _Exposed(http.server.BaseHTTPRequestHandler):
    """A server that answers every route with 200: what vLLM itself on the API port would do."""

    def _ok(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _ok

    def log_message(self, *args: object) -> None:
        pass


def test_health_gate_fails_when_the_api_port_serves_the_admin_routes() -> None:
    from local_server import free_port

    from serving.host import health

    port = free_port()
    spec = stackfile.from_values(dev_values(vllmPort=port), stack="exposed")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Exposed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(HostError, match=r"admin routes .*answered 200, not 403"):
            health.check_proxy(spec, "key")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(HostError, match="does not answer"):
        health.check_proxy(spec, "key")
    local = stackfile.load("local")
    assert health.check_proxy(local, "key") == "no proxy on this target"
