"""Tier 1: faults at runtime (against the fake vLLM of fake_vllm, real folders on disk).

A failed load that harms the rest of the server, folders vLLM may still read, operations cut
half-way, a damaged record, and remove after a restart: each must end in a verified,
recorded state, or say exactly what is recorded and what to run. The same faults run
against a real vLLM CPU server in test_adapters_integration.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from serving.adapters import resolver as lora_resolver
from serving.adapters.client import VllmError
from serving.adapters.journal import Terminated
from serving.adapters.ops import OperationError
from serving.adapters.record import Record, RecordError, RecordStore, Served


def _version_dir(ops: Any, name: str, version: str) -> Path:
    return Path(ops.layout.adapters_dir, name, version)


def _healthy(ops: Any) -> None:
    """Every recorded name and the base model answer as recorded."""
    assert ops._damage(skip=set()) == []


# --- after a failed load, the rest of the server must still answer as before ----------------


def test_poisoned_add_restarts_the_local_server_and_verifies(world) -> None:
    ops, fake, version = world
    ops.add("other", "1", version("other", "1", 5))
    ops.restart = fake.restart
    fake.started_with = dict(fake.loaded)
    fake.heals_on_unload = False  # the engine stays damaged after the unload
    bad = version("new", "1", 6)
    fake.poison_paths.add(str(_version_dir(ops, "new", "1")))
    with pytest.raises(OperationError) as failed:
        ops.add("new", "1", bad)
    assert failed.value.rolled_back and not failed.value.changed
    assert "vLLM was restarted" in failed.value.message
    assert fake.restarts == 1 and not fake.damaged
    assert "new" not in fake.loaded and set(fake.loaded) == {"tone", "other"}
    _healthy(ops)
    assert ops.store.pending() is None
    # The refused version left nothing: the same number can be used for good weights.
    assert not _version_dir(ops, "new", "1").exists()
    fake.poison_paths.clear()
    ops.add("new", "1", version("new", "1b", 7))
    assert ops.record().entries["new"].current.version == "1"


@pytest.mark.parametrize("op", ["add", "hotfix", "rollback"])
def test_poisoned_load_without_restart_says_what_to_do(world, op: str) -> None:
    ops, fake, version = world
    ops.restart_hint = "restart it (`systemctl restart exaone-vllm.service`)"
    fake.heals_on_unload = False  # the engine stays damaged after the unload
    ops.hotfix("tone", "2", version("tone", "2", 6))
    if op == "rollback":
        fake.poison_paths.add(str(ops.record().entries["tone"].history[-1].path))
        call = lambda: ops.rollback("tone")  # noqa: E731
    else:
        name = "new" if op == "add" else "tone"
        fake.poison_paths.add(str(_version_dir(ops, name, "3")))
        folder = version(name, "3", 8)
        call = (lambda: ops.add(name, "3", folder)) if op == "add" else (
            lambda: ops.hotfix(name, "3", folder))
    with pytest.raises(OperationError) as failed:
        call()
    message = failed.value.message
    assert failed.value.changed, message
    assert "vLLM's engine is damaged" in message and "systemctl restart" in message
    assert "adapters reconcile" in message and "the base model does not answer" in message
    # `adapters list` cannot say all is well.
    assert not any(row["in_sync"] for row in ops.rows())
    assert all(not s.verified for s in ops.record().serving().values())
    pending = ops.store.pending()
    assert pending is not None and pending.op == op and pending.problem
    # Nothing else runs on a damaged server until reconcile...
    with pytest.raises(OperationError, match=r"did not end verified.*adapters reconcile") as no:
        ops.add("later", "1", version("later", "1", 9))
    assert not no.value.changed
    # ...which, after the operator's restart, brings everything back verified.
    fake.restart()
    fake.poison_paths.clear()
    ops.reconcile()
    assert ops.store.pending() is None
    assert all(row["in_sync"] for row in ops.rows())
    _healthy(ops)


def test_reconcile_finds_a_damaged_base_model_and_restarts(world) -> None:
    ops, fake, version = world
    ops.add("other", "1", version("other", "1", 5))  # records the base model's answer
    fake.damaged = True  # e.g. a load made by hand through the API
    ops.restart = fake.restart
    outcome = ops.reconcile()
    assert fake.restarts == 1
    assert any(a.startswith("restarted vLLM (the base model") for a in outcome.actions)
    assert set(fake.loaded) == {"tone", "other"}
    _healthy(ops)


def test_reconcile_unloads_a_recorded_version_that_harms_the_server(world) -> None:
    """After a restart, reconcile loads a recorded version whose weights went bad on disk:
    that name is unloaded again (the rest keeps answering), marked unverified, and said."""
    ops, fake, version = world
    ops.add("other", "1", version("other", "1", 5))
    ops.add("new", "1", version("new", "1", 6))
    fake.restart()
    fake.poison_paths.add(str(_version_dir(ops, "new", "1")))
    with pytest.raises(OperationError) as failed:
        ops.reconcile()
    assert "new was unloaded: with version 1 loaded, the base model stopped" in \
        failed.value.message
    assert "new" not in fake.loaded and "other" in fake.loaded
    assert not Path(ops.layout.resolver_dir, "new").exists()
    assert not fake.damaged  # healed by the unload, as vLLM CPU 0.32 did (seen)
    assert not ops.record().entries["new"].current.verified
    assert ops._damage(skip={"new"}) == []
    assert ops.store.pending() is not None


@pytest.mark.parametrize("op", ["add", "hotfix"])
def test_poison_healed_by_the_unload_is_a_plain_refusal(world, op: str) -> None:
    """vLLM CPU 0.32 (seen): NaN weights harm every model only while they are loaded; the
    operation's own undo heals the server, and the check after it says so: no restart."""
    ops, fake, version = world
    ops.restart = fake.restart
    ops.add("other", "1", version("other", "1", 5))
    name = "new" if op == "add" else "tone"
    folder = version(name, "7", 8)
    fake.poison_paths.add(str(_version_dir(ops, name, "7")))
    with pytest.raises(OperationError) as failed:
        getattr(ops, op)(name, "7", folder)
    assert not failed.value.changed and fake.restarts == 0, failed.value.message
    assert not fake.damaged and ops.store.pending() is None
    _healthy(ops)
    assert not _version_dir(ops, name, "7").exists()


def test_a_failed_load_that_harms_nothing_is_a_plain_refusal(world) -> None:
    ops, fake, version = world
    ops.add("other", "1", version("other", "1", 5))
    folder = version("new", "1", 6)
    fake.fail_paths.add(str(_version_dir(ops, "new", "1")))
    calls = len(fake.calls)
    with pytest.raises(VllmError):
        ops.add("new", "1", folder)
    assert not _version_dir(ops, "new", "1").exists()
    assert ops.store.pending() is None
    assert "new" not in ops.record().entries
    # The others were asked after the failed load (the check ran, and passed).
    assert ("load", "new") in fake.calls[calls:]


# --- folders vLLM may still read --------------------------------------------------------------


def test_reconcile_unloads_a_name_whose_folder_is_gone_and_says_what_to_do(world) -> None:
    ops, fake, version = world
    source = version("tone", "2", 6)
    ops.hotfix("tone", "2", source)
    ops.add("other", "1", version("other", "1", 5))
    gone = _version_dir(ops, "tone", "2")
    shutil.rmtree(gone)  # by hand, while vLLM re-reads it (unsettled on vLLM 0.32)
    with pytest.raises(OperationError) as failed:
        ops.reconcile()
    message = failed.value.message
    assert f"its folder {gone} is missing" in message and "adapters remove tone" in message
    assert "tone" not in fake.loaded  # unloaded: vLLM would die reading the missing folder
    assert not Path(ops.layout.resolver_dir, "tone").exists()
    assert "other" in fake.loaded
    # Put the files back: reconcile loads and verifies it.
    shutil.copytree(source, gone)
    ops.reconcile()
    assert fake.loaded["tone"] == str(gone) and ops.store.pending() is None


@pytest.mark.parametrize("where", ["/etc", "outside", "other-name"])
def test_reconcile_with_a_record_pointing_outside_its_folder(world, where: str,
                                                             tmp_path: Path) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    own = _version_dir(ops, "new", "1")
    target = {"/etc": "/etc", "outside": str(tmp_path / "in" / "new" / "1"),
              "other-name": str(_version_dir(ops, "tone", "1"))}[where]
    data = json.loads(ops.store.path.read_text())
    data["adapters"]["new"]["current"]["path"] = target
    ops.store.path.write_text(json.dumps(data))
    fake.loaded.pop("new")
    outcome = ops.reconcile()
    assert f"record: new 1 pointed at {target}, not its folder; now {own}" in outcome.actions
    assert fake.loaded["new"] == str(own)
    assert ops.record().entries["new"].current.path == str(own)
    # Without the version's own folder, nothing is loaded from the foreign path.
    shutil.rmtree(own)
    ops.store.path.write_text(json.dumps(data))
    fake.loaded.pop("new")
    with pytest.raises(OperationError, match=r"is not its folder .* missing.*nothing was loaded"):
        ops.reconcile()
    assert "new" not in fake.loaded


def test_reconcile_survives_resolver_entries_of_missing_folders(world) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    root = Path(ops.layout.resolver_dir)
    # A restart (runtime loads gone), and the version folder deleted by hand.
    fake.restart()
    shutil.rmtree(_version_dir(ops, "new", "1"))
    (root / "stale").symlink_to(root / ".entries" / "stale" / "9")  # dangling
    with pytest.raises(OperationError, match=r"new 1: its folder .* is missing"):
        ops.reconcile()
    assert not (root / "new").exists() and not (root / "stale").is_symlink()
    with pytest.raises(VllmError):  # 404, not a resolver load of missing weights
        fake.complete("new", "x", max_tokens=1)


def test_discard_keeps_a_folder_vllm_has_loaded(world) -> None:
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    path = _version_dir(ops, "new", "1")
    ops._discard(path, True)
    assert path.is_dir()


# --- operations cut half-way ------------------------------------------------------------------


def _cut_in_settle(fake: Any, exc: BaseException) -> None:
    """The cut comes while the hotfix waits to settle: after the record named the new
    version (the attack run's "Connection reset by peer")."""
    def cut() -> Any:
        raise exc

    fake.busy = [cut]


@pytest.mark.parametrize("exc, words", [
    (VllmError("unreachable", "vLLM at http://fake: [Errno 104] Connection reset by peer"),
     "Connection reset by peer"),
    (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
    (Terminated(), "stopped by SIGTERM"),
    (OSError(28, "No space left on device"), "No space left on device"),
], ids=["connection-reset", "ctrl-c", "sigterm", "disk-full"])
def test_a_cut_hotfix_says_what_is_recorded_and_what_to_run(world, exc, words) -> None:
    ops, fake, version = world
    _cut_in_settle(fake, exc)
    with pytest.raises(OperationError) as cut:
        ops.hotfix("tone", "2", version("tone", "2", 6))
    message = cut.value.message
    assert cut.value.changed
    assert message.startswith("`adapters hotfix tone 2` stopped after it had changed")
    assert words in message
    assert "the record says tone serves version 2 (loaded in place, not settled)" in message
    assert "run `adapters reconcile`" in message
    assert ops.store.pending().command == "adapters hotfix tone 2"
    with pytest.raises(OperationError, match="an earlier `adapters hotfix tone 2` did not end"):
        ops.rollback("tone")
    ops.reconcile()
    assert ops.store.pending() is None and ops.record().entries["tone"].current.settled


def test_a_cut_before_any_change_leaves_nothing(world) -> None:
    ops, fake, version = world
    real = fake.complete

    def interrupted(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    fake.complete = interrupted  # type: ignore[method-assign]
    before = ops.store.path.read_bytes() if ops.store.path.exists() else b""
    with pytest.raises(KeyboardInterrupt):
        ops.hotfix("tone", "2", version("tone", "2", 6))
    fake.complete = real  # type: ignore[method-assign]
    assert ops.store.pending() is None
    assert (ops.store.path.read_bytes() if ops.store.path.exists() else b"") == before
    assert fake.loaded["tone"].endswith("tone1")


def test_a_cut_add_after_the_load_is_recorded_as_cut(world) -> None:
    ops, fake, version = world
    real = fake.load

    def load_then_drop(name: str, path: str, *, inplace: bool = False) -> None:
        real(name, path, inplace=inplace)
        if name == "new":
            raise VllmError("unreachable", "vLLM at http://fake did not answer in time")

    fake.load = load_then_drop  # type: ignore[method-assign]
    with pytest.raises(OperationError) as cut:
        ops.add("new", "1", version("new", "1", 5))
    assert cut.value.changed and "did not answer in time" in cut.value.message
    assert "the record has no version serving under new" in cut.value.message
    fake.load = real  # type: ignore[method-assign]
    # reconcile unloads what the record does not serve, and clears the cut.
    ops.reconcile()
    assert "new" not in fake.loaded and ops.store.pending() is None


# --- a damaged record -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [
    b"{", b"\x00" * 64, b"[" * 200_000, json.dumps({"schema": 1, "adapters": []}).encode(),
    b'{"schema": 1, "serial": NaN}',
    json.dumps({"schema": 1, "adapters": {"../../etc": {"current": {
        "version": "1", "path": "/etc"}, "history": []}}}).encode(),
    json.dumps({"schema": 1, "adapters": {"new": {"current": {
        "version": "1/../../x", "path": "/x"}, "history": []}}}).encode(),
], ids=["cut-json", "zeros", "deep", "wrong-shape", "nan", "name-escapes", "version-escapes"])
def test_a_damaged_record_is_refused_and_rebuilt(world, damage: bytes) -> None:
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    ops.hotfix("new", "2", version("new", "2", 6))
    ops.settle()
    ops.store.path.write_bytes(damage)
    with pytest.raises(OperationError, match=r"adapters reconcile --rebuild"):
        ops.rows()
    with pytest.raises(OperationError, match=r"--rebuild"):
        ops.reconcile()
    outcome = ops.reconcile(rebuild=True)
    assert outcome.actions[0].startswith("rebuilt the record")
    record = ops.record()
    assert record.entries["new"].current.version == "2"
    assert [h.version for h in record.entries["new"].history] == ["1"]  # from .prev
    assert all(s.verified for s in record.serving().values())
    assert all(row["in_sync"] for row in ops.rows())
    aside = [p for p in Path(ops.layout.state_dir).iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == damage


def test_rebuild_without_a_previous_generation_uses_what_vllm_serves(world) -> None:
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    ops.store.previous_path.unlink(missing_ok=True)  # one write so far: no previous one
    ops.store.path.write_text("garbage")
    outcome = ops.reconcile(rebuild=True)
    assert "serving new 1, tone 1" in outcome.actions[0]
    assert ops.record().entries["new"].current.verified


# --- remove, every path: the resolver entry goes, and a real request answers 404 -------------


def test_remove_after_a_restart_withdraws_the_entry_of_a_name_the_record_forgot(world) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    fake.restart()  # runtime loads are gone; the resolver entry stays
    data = json.loads(ops.store.path.read_text())
    data["adapters"].pop("new")  # a record that forgot it (rebuilt, or edited by hand)
    ops.store.path.write_text(json.dumps(data))
    outcome = ops.remove("new")
    assert "answers 404" in outcome.message
    assert not Path(ops.layout.resolver_dir, "new").exists()
    with pytest.raises(VllmError):
        fake.complete("new", "x", max_tokens=1)


@pytest.mark.parametrize("state", ["loaded", "restarted", "resolver-loaded"])
def test_remove_proves_the_404_on_every_path(world, state: str) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    if state != "loaded":
        fake.restart()
    if state == "resolver-loaded":
        fake.complete("new", "x", max_tokens=1)  # the resolver loads it on first use
        assert fake.loaded["new"].endswith("lora-resolver/new")
    ops.remove("new")
    assert "new" not in fake.loaded
    assert not lora_resolver.link(ops.layout.resolver_dir, "new").exists()
    with pytest.raises(VllmError):
        fake.complete("new", "x", max_tokens=1)
    assert ops.record().entries["new"].current is None
    assert ops.store.pending() is None


def test_record_store_keeps_the_generation_before_the_last_write(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    first = store.save(Record().set_current("x", Served("1", "/a/x/1"), op="add"))
    second = store.save(first.set_current("x", Served("2", "/a/x/2"), op="hotfix"))
    assert store.load_previous() == first
    store.path.write_text("{")  # damaged
    with pytest.raises(RecordError, match="--rebuild"):
        store.load()
    store.save(second.set_current("x", Served("3", "/a/x/3"), op="hotfix"))
    # The damaged file never becomes the previous generation: the last good one stays.
    assert store.load_previous() == first


# --- the CLI: exit codes and messages of the same faults --------------------------------------


@pytest.fixture
def cli_world(world, monkeypatch: pytest.MonkeyPatch):
    from serving.adapters import cli

    ops, fake, version = world
    monkeypatch.setattr(cli, "_spec", lambda _args: ops.spec)
    monkeypatch.setattr(cli, "make_ops", lambda *_a, **_k: ops)

    def run(*argv: str) -> int:
        return cli.main([*argv, "--config", "unused.yaml"])

    return run, ops, fake, version


def test_cli_exit_4_for_a_cut_operation_and_list_says_not_in_sync(cli_world, capsys) -> None:
    run, _ops, fake, version = cli_world
    source = version("tone", "2", 6)
    _cut_in_settle(fake, VllmError("unreachable", "vLLM at http://fake: Connection reset by "
                                                  "peer"))
    assert run("hotfix", "tone", "2", "--from", str(source)) == 4
    err = capsys.readouterr().err
    assert err.startswith("adapters hotfix tone: `adapters hotfix tone 2` stopped after")
    assert "Connection reset by peer" in err and "run `adapters reconcile`" in err
    assert run("list") == 4
    assert "NOT in sync: `adapters hotfix tone 2` did not end verified" in capsys.readouterr().out
    assert run("rollback", "tone") == 2
    assert "run `adapters reconcile` first" in capsys.readouterr().err
    assert run("reconcile") == 0
    assert run("list") == 0
    assert "NOT in sync" not in capsys.readouterr().out


def test_cli_exit_2_for_an_interrupt_before_any_change(cli_world, capsys) -> None:
    run, _ops, fake, version = cli_world

    def interrupted(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    fake.complete = interrupted  # type: ignore[method-assign]
    assert run("hotfix", "tone", "2", "--from", str(version("tone", "2", 6))) == 2
    assert "interrupted before it changed anything" in capsys.readouterr().err


def test_cli_damaged_record_is_one_line_naming_rebuild(cli_world, capsys) -> None:
    run, ops, _fake, version = cli_world
    ops.add("new", "1", version("new", "1", 5))
    ops.store.path.write_bytes(b"[" * 100_000)
    assert run("list") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "adapters reconcile --rebuild" in lines[0], lines
    assert run("reconcile", "--rebuild") == 0
    assert run("list") == 0


@pytest.mark.parametrize("text", ["[" * 100_000, "{}", "not json", '{"op": 1, "name": []}'],
                         ids=["deep", "empty", "garbage", "wrong-types"])
def test_an_unreadable_intent_still_stops_operations_until_reconcile(world, text: str) -> None:
    ops, _fake, version = world
    ops.store.dir.mkdir(parents=True, exist_ok=True)
    ops.store.intent_path.write_text(text)
    with pytest.raises(OperationError, match=r"an earlier `adapters [^`]*` did not end") as no:
        ops.add("new", "1", version("new", "1", 5))
    assert not no.value.changed
    assert not any(row["in_sync"] for row in ops.rows())
    ops.reconcile()
    assert ops.store.pending() is None


def test_the_local_restart_refuses_a_server_this_checkout_did_not_start(world) -> None:
    from serving.local import run as localrun

    ops, _fake, _version = world
    restart = localrun.restarter(ops.spec, ops.layout, "key")
    with pytest.raises(OperationError, match="not started from this checkout") as no:
        restart()
    assert no.value.changed
