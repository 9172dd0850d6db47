"""Tier 1: the adapter record, the vLLM client's error mapping, the API-key resolver, and the
decisions of the adapter operations (against a fake server; real PEFT folders on disk)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.adapters import resolver as lora_resolver
from serving.adapters.answer import Reference
from serving.adapters.client import (
    LoraActivity,
    VllmClient,
    VllmError,
    parse_lora_activity,
)
from serving.adapters.ops import (
    BASE_OBSERVER,
    CANDIDATE_PREFIX,
    AdapterOps,
    OperationError,
    Probe,
)
from serving.adapters.record import (
    Record,
    RecordError,
    RecordStore,
    Served,
    from_json,
    to_json,
)
from serving.local.loramaker import make_adapter
from serving.local.tinymodel import DEFAULT_MODEL_ID
from serving.stack import secretref
from serving.stack.errors import SpecError
from serving.stack.spec import SecretRef

# --- the record -------------------------------------------------------------------------------


def _served(version: str) -> Served:
    return Served(version, f"/a/x/{version}", probe={"tokens": [version]})


def test_record_history_roll_back_and_remove() -> None:
    record = Record().set_current("x", _served("1"), op="add")
    record = record.set_current("x", _served("2"), op="hotfix")
    entry = record.entries["x"]
    assert entry.current.version == "2" and [h.version for h in entry.history] == ["1"]
    record = record.roll_back("x")
    assert record.entries["x"].current.version == "1" and record.entries["x"].history == ()
    with pytest.raises(RecordError, match="no previous version"):
        record.roll_back("x")
    record = record.remove("x")
    assert record.entries["x"].current is None
    assert [h.version for h in record.entries["x"].history] == ["1"]
    assert record.serving() == {}
    assert [(e["op"], e["from"], e["to"]) for e in record.log] == [
        ("add", None, "1"), ("hotfix", "1", "2"), ("rollback", "2", "1"), ("remove", "1", None)
    ]


def test_record_history_holds_distinct_steps_through_remove_and_re_add() -> None:
    """Remove and re-add of the same version, three times over, is one step, not 'earlier:
    1, 1, 1'; the history never offers the serving version as the one to roll back to."""
    record = Record().set_current("x", _served("1"), op="add")
    for _ in range(3):
        record = record.remove("x").set_current("x", _served("1"), op="add")
    assert record.entries["x"].history == ()
    record = record.set_current("x", _served("2"), op="hotfix").remove("x")
    assert [h.version for h in record.entries["x"].history] == ["1", "2"]
    record = record.set_current("x", _served("2"), op="add")
    assert [h.version for h in record.entries["x"].history] == ["1"]
    assert record.roll_back("x").entries["x"].current.version == "1"


def test_record_written_with_repeated_steps_reads_as_distinct_steps() -> None:
    one = to_json(Record().set_current("x", _served("1"), op="add"))
    one["adapters"]["x"]["history"] = [one["adapters"]["x"]["current"]] * 3
    assert from_json(one).entries["x"].history == ()


def test_record_file_round_trip_is_atomic_and_versioned(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    assert store.load() == Record()
    saved = store.save(Record().set_current("x", _served("1"), op="add"))
    again = store.save(store.load().set_current("x", _served("2"), op="hotfix"))
    assert (saved.serial, again.serial) == (1, 2)
    data = json.loads(store.path.read_text())
    assert data["schema"] == 1 and data["serial"] == 2
    assert data["adapters"]["x"]["current"]["version"] == "2"
    assert from_json(to_json(store.load())) == store.load()
    # No temp files; the generation before the last write is kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json", "adapters.json.prev"]
    assert store.load_previous().serial == 1


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    (json.dumps({"schema": 99}), "schema is 99"),
    (json.dumps({"schema": 1, "adapters": {"x": {"current": {"path": "/p"}}}}), "malformed"),
], ids=["bad-json", "other-schema", "missing-version"])
def test_record_file_problems_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "adapters.json").write_text(text)
    with pytest.raises(RecordError, match=message):
        RecordStore(tmp_path).load()


# --- the client's error mapping ----------------------------------------------------------------


def _client(status: int, body: Any) -> VllmClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return VllmClient("http://vllm.test", "k", transport=httpx.MockTransport(handler))


def _error(call: Callable[[VllmClient], Any], status: int, body: Any) -> VllmError:
    with pytest.raises(VllmError) as caught:
        call(_client(status, body))
    return caught.value


def _err(message: str, kind: str = "X") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": 0}}


@pytest.mark.parametrize("call, status, body, kind, words", [
    (lambda c: c.models(), 401, {"error": "Unauthorized"}, "unauthorized", "refused the API key"),
    (lambda c: c.complete("nope", "p", max_tokens=1), 404,
     _err("The model `nope` does not exist."), "unknown_adapter", "'nope' is not served"),
    (lambda c: c.load("a", "/p"), 400,
     _err("The lora adapter 'a' has already been loaded. If you want ..."), "already_loaded",
     "use `adapters hotfix`"),
    (lambda c: c.load("a", "/bad"), 404,
     _err("Loading lora a failed: No adapter found for /bad"), "bad_adapter",
     "cannot load adapter 'a' from /bad"),
    (lambda c: c.load("a", "/p"), 500, _err("safetensors_rust.SafetensorError: bad"), "server",
     "failed on /v1/load_lora_adapter"),
    (lambda c: c.unload("a"), 404, _err("The lora adapter 'a' cannot be found."),
     "unknown_adapter", "'a' is not loaded"),
    (lambda c: c.load("exaone", "/p"), 400,
     _err("The lora adapter 'exaone' conflicts with a served base model."), "bad_adapter",
     "conflicts with a served base model"),
], ids=["401", "unknown-model", "already-loaded", "bad-path", "load-500", "unload-unknown",
        "base-name"])
def test_vllm_errors_become_clear_messages(call, status, body, kind, words) -> None:
    error = _error(call, status, body)
    assert error.kind == kind and error.status == status
    assert words in error.message


def test_connection_refused_is_clear() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    client = VllmClient("http://127.0.0.1:9", "k", transport=httpx.MockTransport(refuse))
    with pytest.raises(VllmError) as caught:
        client.adapters()
    assert caught.value.kind == "unreachable"
    assert "cannot reach vLLM at http://127.0.0.1:9 (connection refused)" in caught.value.message
    assert client.health() is False


def test_client_sends_key_and_inplace_flag() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="Success")

    VllmClient("http://v", "sekret", transport=httpx.MockTransport(handler)).load(
        "a", "/p", inplace=True)
    assert seen[0].headers["authorization"] == "Bearer sekret"
    assert json.loads(seen[0].content) == {"lora_name": "a", "lora_path": "/p",
                                           "load_inplace": True}


def test_lora_activity_takes_the_newest_sample() -> None:
    text = "\n".join([
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",'
        'waiting_lora_adapters="c"} 1.7e+09',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1.5e+09',
    ])
    assert parse_lora_activity(text) == LoraActivity(
        frozenset("ab"), frozenset("c"), {"a": 1.7e9, "b": 1.7e9, "c": 1.7e9})
    assert not parse_lora_activity("").busy("a")


def test_lora_activity_remembers_when_each_adapter_last_had_work() -> None:
    """A request that ran between two polls: the newest sample is idle, but the label set
    that named the adapter keeps the time of its last step."""
    text = "\n".join([
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",'
        'waiting_lora_adapters=""} 100.5',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",'
        'waiting_lora_adapters=""} 101.0',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
        'waiting_lora_adapters="b"} 102.0',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
        'waiting_lora_adapters=""} 103.0',
    ])
    activity = parse_lora_activity(text)
    assert not activity.busy("a") and not activity.busy("b")
    assert activity.last_seen == {"a": 101.0, "b": 102.0}


def test_requests_between_polls_keep_the_adapter_busy(world) -> None:
    """Every sample is idle, but for the first 8 polls (2 s) a short request ran between
    each two: idle only counts from the last of them (ignoring those would take 1 s)."""
    ops, fake, _version = world
    fake.busy = [lambda: LoraActivity(last_seen={"tone": time.time()})] * 8
    started = time.monotonic()
    assert ops._idle("tone", 10.0)
    assert time.monotonic() - started >= 7 * 0.25 + 1.0 - 0.05  # the 8th poll, plus 1 s


# --- the API key ----------------------------------------------------------------------------


def test_api_key_from_env_file_and_pulumi(tmp_path: Path) -> None:
    assert secretref.resolve(SecretRef(kind="env", name="K"), root=tmp_path,
                             env={"K": " v \n"}) == "v"
    key = tmp_path / "key"
    key.write_text("filekey\n")
    key.chmod(0o600)
    assert secretref.resolve(SecretRef(kind="file", name="key"), root=tmp_path) == "filekey"
    calls: list[list[str]] = []
    got = secretref.resolve(SecretRef(kind="pulumi", name="apiKey"), root=tmp_path,
                            stack="dev", run=lambda argv: calls.append(argv) or "pk\n")
    assert got == "pk" and calls == [["pulumi", "config", "get", "apiKey", "--stack", "dev"]]


@pytest.mark.parametrize("ref, setup, words", [
    (SecretRef(kind="env", name="K"), None, "K is unset"),
    (SecretRef(kind="file", name="missing"), None, "local setup"),
    (SecretRef(kind="file", name="key"), 0o644, "readable by group or others"),
    (SecretRef(kind="none"), None, "apiKey: is not set"),
], ids=["env-unset", "file-missing", "file-too-open", "none"])
def test_api_key_problems_name_the_reference(tmp_path: Path, ref, setup, words) -> None:
    if setup is not None:
        (tmp_path / "key").write_text("k")
        (tmp_path / "key").chmod(setup)
    with pytest.raises(SpecError, match=words):
        secretref.resolve(ref, root=tmp_path, env={})


# --- the operations' decisions, against a fake server --------------------------------------


def test_add_records_the_answer(world) -> None:
    ops, fake, version = world
    outcome = ops.add("new", "1", version("new", "1", 5))
    assert fake.loaded["new"].endswith("/.local/adapters/new/1")
    assert os.path.isfile(Path(fake.loaded["new"]) / "adapter_model.safetensors")
    assert outcome.probe == Probe(("new", "1"), (-0.5, -0.5))
    recorded = Reference.from_json("v1", ops.store.load().entries["new"].current.probe)
    assert recorded is not None and recorded.mean.distance(ops.scores("new")) == 0.0


def test_add_that_answers_like_the_base_is_undone(world) -> None:
    ops, fake, version = world
    path = version("new", "1", 5)
    fake.answers[str(Path(ops.layout.adapters_dir, "new", "1"))] = ("base",)
    with pytest.raises(OperationError, match="answers like the base model"):
        ops.add("new", "1", path)
    assert "new" not in fake.loaded and not ops.store.path.exists()
    # Refused means nothing left: the version folder is gone, its number usable again.
    assert not Path(ops.layout.adapters_dir, "new", "1").exists()


def test_hotfix_swaps_in_place_after_a_candidate_probe(world) -> None:
    ops, fake, version = world
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert outcome.version == "2" and fake.loaded["tone"].endswith("tone/2")
    assert [c for c in fake.calls if c[1].startswith(CANDIDATE_PREFIX)] == [
        ("load", f"{CANDIDATE_PREFIX}tone.2"), ("unload", f"{CANDIDATE_PREFIX}tone.2")]
    assert ("load_inplace", "tone") in fake.calls
    entry = ops.store.load().entries["tone"]
    assert entry.current.version == "2" and [h.version for h in entry.history] == ["1"]


@pytest.mark.parametrize("fault", ["load-fails", "old-weights-keep-answering"])
def test_failed_hotfix_rolls_back_automatically(world, fault: str) -> None:
    ops, fake, version = world
    new = version("tone", "2", 6)
    dest = str(Path(ops.layout.adapters_dir, "tone", "2"))

    def break_it() -> None:
        if fault == "load-fails":
            fake.fail_paths.add(dest)
        else:
            fake.stale.add("tone")

    with pytest.raises(OperationError) as failed:
        ops.hotfix("tone", "2", new, on_staged=break_it)
    assert failed.value.rolled_back and "rolled back to version 1" in failed.value.message
    # 1 serves again, loaded plainly (settled), and the record was never written.
    assert fake.loaded["tone"].endswith("tone1") and not ops.store.path.exists()
    assert failed.value.message.endswith("verified (settled)") and "tone" not in fake.inplace
    # Refused and rolled back: the new version's folder is not left behind.
    assert not Path(dest).exists()


def test_failed_in_place_rollback_falls_back_to_a_plain_reload(world) -> None:
    """Neither version loads in place any more: the name is unloaded and loaded plainly; the
    load fails too, and the resolver entry (pointing at version 1) answers the check."""
    ops, fake, version = world
    new = version("tone", "2", 6)
    old = fake.loaded["tone"]

    def break_both() -> None:
        fake.fail_paths.update({str(Path(ops.layout.adapters_dir, "tone", "2")), old})

    with pytest.raises(OperationError, match="brought back to version 1 by a plain unload "
                       "and load, verified") as failed:
        ops.hotfix("tone", "2", new, on_staged=break_both)
    assert failed.value.rolled_back and not failed.value.changed
    assert fake.loaded["tone"] == str(Path(ops.layout.resolver_dir, "tone"))
    assert "tone" not in fake.inplace
    current = ops.record().entries["tone"].current
    assert current.version == "1" and current.verified


def test_when_nothing_brings_the_old_version_back_the_record_says_unverified(world) -> None:
    ops, fake, version = world
    new = version("tone", "2", 6)
    old = fake.loaded["tone"]

    def break_everything() -> None:
        fake.fail_paths.update({str(Path(ops.layout.adapters_dir, "tone", "2")), old})
        fake.resolver = None  # and no resolver entry answers for the name

    with pytest.raises(OperationError, match="could not be brought back") as failed:
        ops.hotfix("tone", "2", new, on_staged=break_everything)
    assert failed.value.changed and "marked unverified" in failed.value.message
    assert "adapters reconcile" in failed.value.message
    assert ops.store.load().entries["tone"].current.verified is False
    assert [r["verified"] for r in ops.rows() if r["name"] == "tone"] == [False]
    # Once the weights load again, reconcile loads, verifies and records it.
    fake.fail_paths.clear()
    outcome = ops.reconcile()
    assert "loaded tone 1" in outcome.message
    assert ops.store.load().entries["tone"].current.verified


def test_hotfix_refused_when_the_new_version_answers_like_the_old(world) -> None:
    ops, fake, version = world
    new = version("tone", "2", 6)
    fake.answers[str(Path(ops.layout.adapters_dir, "tone", "2"))] = ("tone1",)
    fake.answers[fake.loaded["tone"]] = ("tone1",)
    with pytest.raises(OperationError, match=r"version 2 of tone answers like the serving "
                       r"version 1: its weights do not change the answer \(score distance 0,"
                       r".*\); nothing changed"):
        ops.hotfix("tone", "2", new)
    assert ("load_inplace", "tone") not in fake.calls


def test_versions_are_immutable(world) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    ops.hotfix("new", "2", version("new", "2", 7))
    ops.rollback("new")
    calls = len(fake.calls)
    with pytest.raises(OperationError, match="versions are immutable"):
        ops.hotfix("new", "2", version("other", "1", 9))
    assert fake.calls[calls:] == [] or all(c[0] != "load_inplace" for c in fake.calls[calls:])
    assert fake.loaded["new"].endswith("/new/1")


def test_rollback_goes_to_the_previous_version(world) -> None:
    ops, fake, version = world
    ops.hotfix("tone", "2", version("tone", "2", 6))
    outcome = ops.rollback("tone")
    assert outcome.version == "1" and fake.loaded["tone"].endswith("tone1")
    with pytest.raises(OperationError, match="no earlier version"):
        ops.rollback("tone")


def test_rollback_after_remove_and_re_add_names_the_real_cause(world) -> None:
    ops, _fake, _version = world
    ops.reconcile()
    for _ in range(2):
        ops.remove("tone", deadline_s=10)
        ops.add("tone", "1")
    assert ops.rows()[0]["history"] == []
    with pytest.raises(OperationError, match="no earlier version") as info:
        ops.rollback("tone")
    assert "answers like" not in info.value.message


def test_hotfix_to_the_same_files_is_refused_by_digest_not_by_answers(world, tmp_path) -> None:
    ops, _fake, _version = world
    ops.reconcile()
    with pytest.raises(OperationError, match="same files as the serving version 1") as info:
        ops.hotfix("tone", "2", tmp_path / "tone1")
    assert "nothing changed" in info.value.message and "answers like" not in info.value.message
    assert not (Path(ops.layout.adapters_dir) / "tone" / "2").exists()


def test_remove_waits_for_requests_then_confirms_404(world) -> None:
    ops, fake, _version = world
    fake.busy = [LoraActivity(frozenset({"tone"})), LoraActivity(waiting=frozenset({"tone"}))]
    ops.remove("tone", deadline_s=10)
    assert "tone" not in fake.loaded and fake.busy == []
    assert ops.store.load().entries["tone"].current is None


def test_remove_needs_a_whole_idle_window(world) -> None:
    """One idle sample between busy ones is the metric lagging, not a drained adapter."""
    ops, fake, _version = world
    busy = LoraActivity(frozenset({"tone"}))
    fake.busy = [busy, LoraActivity(), busy]
    started = time.monotonic()
    ops.remove("tone", deadline_s=10)
    assert fake.busy == [] and "tone" not in fake.loaded
    assert time.monotonic() - started >= 1.0


def test_remove_gives_up_at_the_deadline(world) -> None:
    ops, fake, _version = world
    fake.busy = [LoraActivity(frozenset({"tone"}))] * 1000
    with pytest.raises(OperationError, match="was not idle"):
        ops.remove("tone", deadline_s=0.3)
    assert "tone" in fake.loaded and not ops.store.path.exists()


@pytest.mark.parametrize("name, words", [
    ("exaone-tiny", "base model's name"), ("Bad Name", "malformed"),
    ("_candidate.x", "malformed"),
], ids=["base-name", "malformed", "candidate-prefix"])
def test_bad_names_are_refused(world, name: str, words: str) -> None:
    ops, fake, version = world
    with pytest.raises(OperationError, match=words):
        ops.add(name, "1", version("x", "1", 5))
    assert set(fake.loaded) == {"tone"}


def test_reconcile_makes_loaded_equal_record(world) -> None:
    ops, fake, version = world
    ops.add("kept", "1", version("kept", "1", 5))
    ops.hotfix("tone", "2", version("tone", "2", 6))
    ops.add("gone", "1", version("gone", "1", 7))
    ops.remove("gone")
    want = {n: s.path for n, s in ops.record().serving().items()}
    # A restart: only the spec's --lora-modules, plus a leftover candidate.
    fake.loaded = {"tone": want["tone"].replace("/adapters/tone/2", "/x"),
                   "gone": "/somewhere", f"{CANDIDATE_PREFIX}tone.3": "/c"}
    fake.answers[fake.loaded["tone"]] = ("old",)
    fake.loaded["tone"] = str(ops.layout.adapters_dir) + "/../../tone1"  # version 1, on disk
    outcome = ops.reconcile()
    assert fake.loaded == want
    assert {a.split(" ")[0] for a in outcome.actions} == {"unloaded", "loaded", "reloaded"}
    assert ops.reconcile().message == "already in sync"


# --- settling after an in-place load (serving.adapters.resolver) --------------------------------


def test_hotfix_settles_when_the_adapter_is_quiet(world) -> None:
    ops, fake, version = world
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert "settled" in outcome.message and "tone" not in fake.inplace
    tail = fake.calls[fake.calls.index(("load_inplace", "tone")):]
    assert tail[:3] == [("load_inplace", "tone"), ("unload", "tone"), ("load", "tone")]
    assert ops.store.load().entries["tone"].current.settled
    link = Path(ops.layout.resolver_dir, "tone")
    assert (link / "adapter_model.safetensors").resolve().parent == Path(fake.loaded["tone"])


def test_busy_adapter_settles_later_and_no_request_misses_it(world) -> None:
    ops, fake, version = world
    ops.settle_wait_s, ops.settle_policy = 0.5, "pause"
    fake.busy = [LoraActivity(frozenset({"tone"}))] * 20
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert "not settled" in outcome.message and "adapters settle tone" in outcome.message
    assert "tone" in fake.inplace and not ops.store.load().entries["tone"].current.settled
    assert [r["settled"] for r in ops.rows() if r["name"] == "tone"] == [False]
    # Later, in a quiet moment; a request arrives between unload and load and the resolver
    # loads the name's entry first: vLLM then refuses our load as already loaded.
    fake.busy, fake.race_on_unload = [], True
    done = ops.settle()
    assert done.actions == ("settled tone 2",) and "tone" not in fake.inplace
    assert fake.loaded["tone"] == str(Path(ops.layout.resolver_dir, "tone"))
    assert [r["in_sync"] for r in ops.rows() if r["name"] == "tone"] == [True]
    assert ops.store.load().entries["tone"].current.settled
    assert ops.settle().message == "nothing was loaded in place"
    assert ops.reconcile().message == "already in sync"


def test_settle_refuses_names_that_serve_nothing(world) -> None:
    ops, _fake, _version = world
    with pytest.raises(OperationError, match="serves no version"):
        ops.settle(["nope"])


def test_busy_adapter_is_settled_when_the_wait_ends_by_default(world) -> None:
    """adapterSettle: force (the default): no pause came, the settle happens anyway."""
    ops, fake, version = world
    ops.settle_wait_s = 0.5
    fake.busy = [LoraActivity(frozenset({"tone"}))] * 20
    started = time.monotonic()
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert outcome.message.endswith("verified; settled") and "tone" not in fake.inplace
    assert time.monotonic() - started >= 1.25  # it waited the whole window first
    assert ops.store.load().entries["tone"].current.settled


def test_no_settle_from_vllm_0_33_on(world) -> None:
    ops, fake, version = world
    ops.spec = ops.spec.model_copy(update={
        "vllm": ops.spec.vllm.model_copy(update={"version": "0.33.0"})})
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert "nothing to settle (vLLM 0.33.0 clears the in-place flag" in outcome.message
    tail = fake.calls[fake.calls.index(("load_inplace", "tone")):]
    assert ("unload", "tone") not in tail
    assert ops.store.load().entries["tone"].current.settled


def test_settle_busy_changes_nothing(world) -> None:
    ops, fake, version = world
    ops.settle_wait_s, ops.settle_policy = 0.3, "pause"
    fake.busy = [LoraActivity(frozenset({"tone"}))] * 40
    ops.hotfix("tone", "2", version("tone", "2", 6))
    calls = len(fake.calls)
    with pytest.raises(OperationError, match=r"did not pause within 1\.25 s"):
        ops.settle(["tone"], wait_s=0.3)
    assert not any(c[0] in ("unload", "load") for c in fake.calls[calls:])


def test_remove_withdraws_the_resolver_entry_first(world) -> None:
    ops, fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    assert Path(ops.layout.resolver_dir, "new").is_symlink()
    ops.remove("new")
    assert not Path(ops.layout.resolver_dir, "new").exists()
    with pytest.raises(VllmError):  # no resolver entry brings it back
        fake.complete("new", "x", max_tokens=1)


def test_reconcile_brings_the_resolver_folder_to_the_record(world) -> None:
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    root = Path(ops.layout.resolver_dir)
    lora_resolver.withdraw(root, "new")
    (root / "stray").symlink_to(root)  # a name the record does not serve
    outcome = ops.reconcile()
    assert "resolver entry new -> 1" in outcome.actions
    assert "resolver entry stray withdrawn" in outcome.actions
    assert lora_resolver.published(root, "new") == "1" and not (root / "stray").exists()
    assert lora_resolver.published(root, "tone") == "1"


def test_resolver_entry_names_the_served_model_and_links_the_weights(tmp_path: Path,
                                                                   tiny_model: Path) -> None:
    v1 = make_adapter(tmp_path / "a" / "1", base=tiny_model, rank=8, seed=1,
                      base_model_id=DEFAULT_MODEL_ID)
    v2 = make_adapter(tmp_path / "a" / "2", base=tiny_model, rank=8, seed=2,
                      base_model_id=DEFAULT_MODEL_ID)
    root = tmp_path / "resolver"
    serving = {"a": Served("1", str(v1))}
    assert lora_resolver.differences(root, serving, "/models/m") == [
        f"create {root}", "resolver entry a -> 1"]
    assert lora_resolver.sync(root, serving, "/models/m")
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    original = json.loads((v1 / "adapter_config.json").read_text())
    # vLLM's resolver compares this field with --model; everything else is the adapter's.
    assert config == {**original, "base_model_name_or_path": "/models/m"}
    assert (root / "a" / "adapter_model.safetensors").resolve() == \
        (v1 / "adapter_model.safetensors").resolve()
    assert lora_resolver.differences(root, serving, "/models/m") == []
    assert lora_resolver.sync(root, serving, "/models/m") == []
    assert lora_resolver.differences(root, serving, "/models/other") == [
        "resolver entry a -> 1"]
    assert lora_resolver.publish(root, "a", "2", v2, "/models/m")
    assert lora_resolver.published(root, "a") == "2"
    lora_resolver.sync(root, {"a": Served("2", str(v2))}, "/models/m")
    assert sorted(p.name for p in (root / ".entries" / "a").iterdir()) == ["2"]
    assert lora_resolver.sync(root, {}, "/models/m") == ["resolver entry a withdrawn"]
    assert sorted(p.name for p in root.iterdir()) == [".entries"]


# --- under a GPU's noise (the fake jitters adapters' scores as CUDA vLLM does) ---------------


@pytest.fixture
def noisy_world(world):
    """The same world served as by CUDA vLLM 0.25.1: teacher-forced scores, and every
    adapter's per-token scores move by ~0.6 between repeats (as measured on an H200)."""
    ops, fake, version = world
    ops.spec = ops.spec.model_copy(update={"vllm": ops.spec.vllm.model_copy(
        update={"package": "vllm", "version": "0.25.1"})})
    fake.noise = 0.6
    return ops, fake, version


def test_twenty_hotfix_rollback_cycles_under_gpu_noise_are_all_verified(noisy_world) -> None:
    ops, _fake, version = noisy_world
    new = version("tone", "2", 6)
    for _ in range(20):
        assert ops.hotfix("tone", "2", new).version == "2"
        assert ops.rollback("tone").version == "1"
    current = ops.store.load().entries["tone"].current
    assert current.version == "1" and current.verified and current.settled


def test_under_gpu_noise_old_weights_answering_are_still_caught(noisy_world) -> None:
    ops, fake, version = noisy_world
    new = version("tone", "2", 6)
    with pytest.raises(OperationError, match="version 1 still answers") as failed:
        ops.hotfix("tone", "2", new, on_staged=lambda: fake.stale.add("tone"))
    assert failed.value.rolled_back and "rolled back to version 1, verified" in \
        failed.value.message


def test_under_gpu_noise_a_new_version_like_the_old_is_refused(noisy_world) -> None:
    ops, fake, version = noisy_world
    new = version("tone", "2", 6)
    fake.answers[str(Path(ops.layout.adapters_dir, "tone", "2"))] = ("tone1",)
    fake.answers[fake.loaded["tone"]] = ("tone1",)
    with pytest.raises(OperationError, match="answers like the serving version 1"):
        ops.hotfix("tone", "2", new)
    assert ("load_inplace", "tone") not in fake.calls


# --- the base model's answer while adapters have traffic (vLLM CPU 0.32) ---------------------


def _recorded_base(ops: AdapterOps) -> tuple[tuple[str, ...], ...]:
    ref = Reference.from_json("base", (ops.store.load().base or {}).get("reference"))
    assert ref is not None
    return ref.mean.tokens


@pytest.mark.parametrize("batched_with", ["tone", "new"])
def test_base_model_batched_with_adapters_is_observed_as_itself(world, batched_with) -> None:
    """vLLM CPU 0.32 answers a base-model request batched with adapters' requests like the
    adapter in its last LoRA slot. Every operation still verifies, and what the record keeps
    as the base model's answer is the base model's own, observed through zero weights."""
    ops, fake, version = world
    fake.base_batched_with = batched_with
    ops.add("new", "1", version("new", "1", 5))
    ops.hotfix("tone", "2", version("tone", "2", 6))
    assert ops.rollback("tone").version == "1"
    assert _recorded_base(ops) == (("base",),)
    assert BASE_OBSERVER not in fake.loaded
    assert ("load", BASE_OBSERVER) in fake.calls and ("unload", BASE_OBSERVER) in fake.calls
    assert all(ops.store.load().serving()[n].verified for n in ("new", "tone"))


def test_the_observer_is_an_adapter_the_checks_accept_with_all_weights_zero(
        world, tmp_path: Path) -> None:
    """What vLLM loads to observe the base model: a valid PEFT LoRA folder for this model,
    readable by the serving user, whose every weight is 0.0 (so it adds nothing)."""
    from safetensors.torch import load_file

    from serving.adapters.checks import check_adapter
    from serving.adapters.weights import write_zero_adapter

    ops, _fake, _version = world
    folder = write_zero_adapter(tmp_path / "observer", ops._dims(), DEFAULT_MODEL_ID)
    assert check_adapter(folder, dims=ops._dims(), base_model_id=DEFAULT_MODEL_ID,
                         max_lora_rank=8) == []
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == 2 and all(not t.any() for t in tensors.values())
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in folder.iterdir())


def test_no_observer_off_the_cpu_build(noisy_world) -> None:
    """CUDA vLLM handles "no adapter" in a mixed batch: the base model is asked directly."""
    ops, fake, version = noisy_world
    ops.hotfix("tone", "2", version("tone", "2", 6))
    assert not any(c[1] == BASE_OBSERVER for c in fake.calls)


def test_a_serving_version_that_answers_like_the_base_is_taken_as_one_with_it(world) -> None:
    """Hot-fixing weights that do nothing: the serving version and the base model cannot be
    told apart; the check says so and decides between the new version and them as one,
    rather than observing two twins and ending undecided."""
    ops, fake, version = world
    said: list[str] = []
    ops.say = said.append
    fake.answers[fake.loaded["tone"]] = ("base",)
    outcome = ops.hotfix("tone", "2", version("tone", "2", 6))
    assert outcome.version == "2"
    assert any("the base model" in m and "takes them as one" in m for m in said), said
    # Back to weights that do nothing is refused, as any version that answers like the base.
    with pytest.raises(OperationError, match="version 1 of tone answers like the base model"):
        ops.rollback("tone")
    assert ops.store.load().serving()["tone"].version == "2"


def test_reconcile_learns_again_a_recorded_answer_that_is_the_base_models(world) -> None:
    """A record written while the base model answered like the adapter (before it was
    observed apart): reconcile does not verify against it, it learns the answer again."""
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    record = ops.store.load()
    served = record.serving()["new"]
    base = ops.reference("exaone-tiny", "base")
    ops.store.save(record.updated("new", dataclasses.replace(served, probe=base.to_json())))
    said: list[str] = []
    ops.say = said.append
    ops.reconcile()
    fresh = Reference.from_json("version 1", ops.store.load().serving()["new"].probe)
    assert fresh is not None and fresh.mean.tokens != base.mean.tokens
    assert any("recorded answer is the base model's" in m for m in said), said


# --- faults around a hotfix ------------------------------------------------------------------


def test_two_operators_hotfixing_one_name_are_serialised(world) -> None:
    """Two tools on one host (the lock file beside the record): the second waits for the
    first, then swaps from what the first left; the record holds both steps in order."""
    import threading

    ops, fake, version = world
    other = AdapterOps(ops.spec, ops.layout, fake, RecordStore(ops.layout.state_dir))  # type: ignore[arg-type]
    v2, v3 = version("tone", "2", 6), version("tone", "3", 7)
    errors: list[Exception] = []

    def run(o: AdapterOps, v: str, src: Path) -> None:
        try:
            o.hotfix("tone", v, src)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ops, "2", v2)),
               threading.Thread(target=run, args=(other, "3", v3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entry = ops.store.load().entries["tone"]
    assert [h.version for h in entry.history] + [entry.current.version] in (
        ["1", "2", "3"], ["1", "3", "2"])
    candidates = [c for c in fake.calls if c[1].startswith(CANDIDATE_PREFIX)]
    # Each operation's candidate is loaded and unloaded before the other's starts.
    assert candidates[0][1] == candidates[1][1] and candidates[2][1] == candidates[3][1]


def test_a_missing_resolver_entry_is_written_again_by_the_hotfix(world) -> None:
    ops, _fake, version = world
    ops.add("new", "1", version("new", "1", 5))
    lora_resolver.withdraw(Path(ops.layout.resolver_dir), "new")
    ops.hotfix("new", "2", version("new", "2", 6))
    assert lora_resolver.published(Path(ops.layout.resolver_dir), "new") == "2"


def test_vllm_gone_mid_hotfix_leaves_the_record_and_says_what_to_run(world) -> None:
    """vLLM dies right after the in-place swap: nothing can be verified or undone, the record
    still says version 1, and the message says so and names the command to run."""
    ops, fake, version = world
    new = version("tone", "2", 6)
    real_load = fake.load

    def dying_load(name: str, path: str, *, inplace: bool = False) -> None:
        real_load(name, path, inplace=inplace)
        if inplace:
            def gone(*_a: Any, **_k: Any) -> Any:
                raise VllmError("unreachable", "cannot reach vLLM at http://fake")
            fake.load = fake.unload = fake.complete = fake.score = gone  # type: ignore[method-assign]

    fake.load = dying_load  # type: ignore[method-assign]
    with pytest.raises(OperationError) as failed:
        ops.hotfix("tone", "2", new)
    assert failed.value.changed
    assert "cannot reach vLLM" in failed.value.message
    assert "adapters reconcile" in failed.value.message
    assert ops.record().entries["tone"].current.version == "1"
