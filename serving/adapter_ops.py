"""Adapter operations at runtime: add, hotfix, rollback, remove, reconcile, list.

Each operation is checked by what the model answers, not by vLLM's status codes (vLLM has
been seen to report an adapter loaded while the base model still answers, and to leave an
unloaded adapter in its slot). The check is a probe: a fixed prompt, greedy, a fixed number
of tokens, with each token's logprob. Two answers are the same when their tokens agree and
every logprob is within MATCH_TOLERANCE.

The record (``serving.adapter_record``) says which version serves under each name; the
spec's adapters are the starting point for names the record has not seen yet.

Hotfix and rollback swap weights with vLLM's in-place load: the name never stops answering.
vLLM 0.32 then re-reads those weights on every engine step until the name is loaded again
without ``load_inplace``; "settling" does that (unload + load) once the adapter's requests
have paused for a moment, with vLLM's filesystem resolver (``serving.lora_resolver``)
answering any request that arrives in between. Under steady traffic the settle is deferred
(``adapters settle``) rather than risked.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from pathlib import Path
from typing import Any

from serving import lora_resolver, vllm_args
from serving.adapter_check import base_dims, check_adapter
from serving.adapter_record import Entry, Record, RecordError, RecordStore, Served
from serving.atomic import replace_folder
from serving.catalog import EXAONE_MODELS
from serving.digest import DigestError, folder_digest
from serving.layout import Layout
from serving.spec import ADAPTER_NAME_RE, VERSION_RE, Spec
from serving.vllm_client import VllmClient, VllmError

PROBE_PROMPT = "Hello! How are you today?"
PROBE_MAX_TOKENS = 12
# Greedy decoding on the same weights gives the same tokens; logprobs may move a little with
# batch composition (other requests in the same step), far less than an adapter moves them.
MATCH_TOLERANCE = 0.05
# Runtime-loaded names that hold a version under test. vLLM accepts any name; adapter names
# cannot start with "_", so these never collide with a real adapter.
CANDIDATE_PREFIX = "_candidate."
REMOVE_DEADLINE_SECONDS = 60.0
# How long hotfix/rollback/reconcile wait for a pause in an adapter's requests to settle it.
SETTLE_WAIT_SECONDS = 15.0
_DRAIN_POLL_SECONDS = 0.25
_DRAIN_IDLE_SECONDS = 1.0  # idle must hold this long: the metric can lag a new request
_ROLLBACK_ATTEMPTS = 3


class OperationError(Exception):
    """An operation did not complete. ``changed`` says whether anything was left changed."""

    def __init__(self, message: str, *, changed: bool = False, rolled_back: bool = False):
        super().__init__(message)
        self.message = message
        self.changed = changed
        self.rolled_back = rolled_back


@dataclass(frozen=True)
class Probe:
    """A model's greedy answer to the probe prompt: tokens and their logprobs."""

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def distance(self, other: Probe) -> float:
        """inf when the tokens differ, else the largest logprob difference."""
        if self.tokens != other.tokens or len(self.logprobs) != len(other.logprobs):
            return math.inf
        return max((abs(a - b) for a, b in zip(self.logprobs, other.logprobs, strict=True)),
                   default=0.0)

    def same(self, other: Probe) -> bool:
        return self.distance(other) <= MATCH_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {"prompt": PROBE_PROMPT, "max_tokens": PROBE_MAX_TOKENS,
                "tokens": list(self.tokens), "logprobs": [round(x, 6) for x in self.logprobs]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Probe | None:
        if not data or data.get("prompt") != PROBE_PROMPT or \
                data.get("max_tokens") != PROBE_MAX_TOKENS:
            return None  # recorded with another probe: not comparable
        return cls(tuple(data["tokens"]), tuple(float(x) for x in data["logprobs"]))


@dataclass(frozen=True)
class Outcome:
    """What an operation did, for the CLI, the demo and the bench."""

    op: str
    name: str
    message: str
    version: str | None = None
    probe: Probe | None = None
    actions: tuple[str, ...] = ()
    # hotfix/rollback: seconds until the new version answered (checked), and of the settle
    # after it (the wait for a pause in its requests included).
    live_s: float | None = None
    settle_s: float | None = None


def probe_answer(client: VllmClient, model: str) -> Probe:
    """``model``'s greedy answer to the fixed probe prompt, with its logprobs."""
    answer = client.complete(
        model, PROBE_PROMPT, max_tokens=PROBE_MAX_TOKENS, temperature=0.0, logprobs=1
    )
    if not answer.tokens:
        raise OperationError(f"vLLM returned no tokens for the probe of {model!r}")
    return Probe(answer.tokens, answer.logprobs)


@dataclass
class AdapterOps:
    """Operations against one server (``client``) for one stack (``spec`` on ``layout``)."""

    spec: Spec
    layout: Layout
    client: VllmClient
    store: RecordStore
    say: Callable[[str], None] = field(default=lambda _msg: None)
    settle_wait_s: float = SETTLE_WAIT_SECONDS

    # --- reading ------------------------------------------------------------------------

    def record(self) -> Record:
        """The record, with the spec's adapters filled in for names it has not seen."""
        try:
            record = self.store.load()
        except RecordError as exc:
            raise OperationError(str(exc)) from None
        entries = dict(record.entries)
        for adapter in self.spec.adapters:
            if adapter.name not in entries:
                entries[adapter.name] = Entry(adapter.name, Served(
                    adapter.version, self.layout.adapter_path(self.spec, adapter),
                    adapter.sha256,
                ))
        return Record(record.serial, entries, record.log)

    def version_path(self, name: str, version: str) -> Path:
        """Where version ``version`` of ``name`` lives: ``<adapters_dir>/<name>/<version>``."""
        for adapter in self.spec.adapters:
            if adapter.name == name and adapter.version == version:
                return Path(self.layout.adapter_path(self.spec, adapter))
        return Path(self.layout.adapters_dir, name, version)

    def probe(self, model: str) -> Probe:
        return probe_answer(self.client, model)

    def rows(self) -> list[dict[str, Any]]:
        """One row per known or loaded name: record version, history, what vLLM has loaded."""
        record = self.record()
        loaded = self.client.adapters()
        names = sorted(set(record.entries) | set(loaded))
        rows = []
        for name in names:
            entry = record.entries.get(name)
            current = entry.current if entry else None
            rows.append({
                "name": name,
                "version": current.version if current else None,
                "history": [h.version for h in entry.history] if entry else [],
                "loaded": name in loaded,
                "path": loaded.get(name) or (current.path if current else ""),
                "in_sync": (name in loaded) == (current is not None)
                and (current is None or self._loaded_as(name, loaded.get(name), current)),
                "settled": current.settled if current else True,
            })
        return rows

    # --- input checks (nothing has changed when these fail) ---------------------------------

    def _check_name(self, name: str) -> None:
        if name == self.spec.model.served_name:
            raise OperationError(
                f"{name!r} is the base model's name (servedModelName); allowed: any other name"
            )
        if not ADAPTER_NAME_RE.match(name):
            raise OperationError(f"adapter name {name!r} is malformed; allowed: "
                                 f"{ADAPTER_NAME_RE.pattern}")

    def _check_version(self, version: str) -> None:
        if not VERSION_RE.match(version):
            raise OperationError(
                f"version {version!r} is malformed; allowed: letters, digits, . _ - (at most 32)"
            )

    def _dims(self):
        if self.spec.model.id in EXAONE_MODELS:
            return EXAONE_MODELS[self.spec.model.id]
        return base_dims(self.layout.model_path(self.spec))

    def _check_folder(self, path: Path, sha256: str | None = None) -> None:
        problems = check_adapter(
            path, dims=self._dims(), base_model_id=self.spec.model.id,
            max_lora_rank=self.spec.max_lora_rank, sha256=sha256,
        )
        if problems:
            raise OperationError("; ".join(str(p) for p in problems))

    def _install(self, name: str, version: str, source: Path | None) -> Path:
        """Check the new version's folder and put it at its place; versions are immutable."""
        dest = self.version_path(name, version)
        if source is None:
            if not dest.is_dir():
                raise OperationError(
                    f"{dest} does not exist; pass --from FOLDER with version {version} of {name}"
                )
            self._check_folder(dest)
            return dest
        source = Path(source)
        self._check_folder(source)
        if dest.exists():
            try:
                same = folder_digest(dest) == folder_digest(source)
            except (DigestError, OSError) as exc:
                raise OperationError(f"{dest}: cannot compare with {source}: {exc}") from None
            if not same:
                raise OperationError(
                    f"{dest} already holds other files for version {version} of {name}; "
                    "versions are immutable, give the new weights a new version"
                )
            return dest
        return replace_folder(
            dest, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True)
        )

    def _sha(self, path: Path) -> str:
        try:
            return folder_digest(path)
        except (DigestError, OSError):
            return ""

    # --- the resolver folder and settling --------------------------------------------------

    def _resolver(self) -> Path | None:
        folder = vllm_args.resolver_dir(self.spec, self.layout)
        return Path(folder) if folder else None

    def _publish(self, name: str, served: Served) -> None:
        root = self._resolver()
        if root is None:
            return
        try:
            lora_resolver.publish(root, name, served.version, served.path,
                                  self.layout.model_path(self.spec))
        except lora_resolver.ResolverError as exc:
            raise OperationError(f"{name}: the resolver entry could not be written: {exc}",
                                 changed=True) from None

    def _withdraw(self, name: str) -> None:
        root = self._resolver()
        if root is not None:
            lora_resolver.withdraw(root, name)

    def _loaded_as(self, name: str, loaded_path: str | None, served: Served) -> bool:
        """vLLM holds ``served`` under ``name``: loaded from its folder, or by the resolver
        from the name's entry while that entry points at the same version."""
        if loaded_path == served.path:
            return True
        root = self._resolver()
        return (root is not None and loaded_path == str(lora_resolver.link(root, name))
                and lora_resolver.published(root, name) == served.version)

    def _settle(self, name: str, served: Served, expected: Probe, wait_s: float) -> bool:
        """Load ``name`` again without ``load_inplace`` once its requests have paused.

        False, and nothing done, when there is no resolver folder to answer requests that
        arrive between unload and load, or when no pause of ``_DRAIN_IDLE_SECONDS`` came
        within ``wait_s``. A request that had passed vLLM's model check just before the
        unload can still miss the name (vLLM looks it up twice); waiting for a pause is what
        keeps that away.
        """
        if self._resolver() is None or wait_s <= 0 or \
                not self._idle(name, _settle_window(wait_s)):
            return False
        self.client.unload(name)
        try:
            self.client.load(name, served.path)
        except VllmError as exc:
            # already_loaded: a request in between made the resolver load the name's entry,
            # which points at the same version. Anything else: the probe below is a request
            # too, so the resolver loads it, or the probe fails and says so.
            if exc.kind != "already_loaded":
                self.say(f"settle {name}: loading it again failed ({exc.message}); "
                         "the resolver entry should answer")
        try:
            actual = self.probe(name)
        except VllmError as exc:
            raise OperationError(f"settling {name} {served.version}: it does not answer "
                                 f"after loading it again ({exc.message}); run `adapters "
                                 "reconcile`", changed=True) from None
        if not actual.same(expected):
            raise OperationError(
                f"settling {name} {served.version}: it answers {actual.text!r} after loading "
                f"it again, {expected.text!r} before; run `adapters reconcile`", changed=True)
        return True

    def _went_live_in_place(self, name: str, served: Served, probe: Probe) -> str:
        """``served`` was just loaded in place under ``name`` and answers ``probe``: point its
        resolver entry at it, settle it if its requests pause, and record whether it is
        settled; a phrase for the outcome.

        Callers that change the record (hotfix, rollback, reconcile) have saved ``served``
        as unsettled first, so a cut run leaves the truth behind. An automatic rollback
        leaves the record alone when the settle succeeds: nothing about it changed.
        """
        self._publish(name, served)
        settled = self._settle(name, served, probe, self.settle_wait_s)
        record = self.record()
        current = record.entries[name].current
        if current is not None and current.settled != settled:
            self.store.save(record.updated(name, replaced(current, settled=settled)))
        return "settled" if settled else self._deferred(name, self.settle_wait_s)

    def _deferred(self, name: str, wait_s: float) -> str:
        if self._resolver() is None:
            why = "no resolver folder (VLLM_LORA_RESOLVER_CACHE_DIR) covers the reload"
        elif wait_s <= 0:
            why = "settling was not asked for"
        else:
            why = f"its requests did not pause within {_settle_window(wait_s):g} s"
        return (f"not settled ({why}): vLLM re-reads its weights on every step until "
                f"`adapters settle {name}` runs")

    # --- building blocks ----------------------------------------------------------------------

    def _expected(self, name: str, version: str, path: Path) -> Probe:
        """The answer ``path`` gives, learnt under a candidate name that is unloaded after."""
        candidate = f"{CANDIDATE_PREFIX}{name}.{version}"
        if candidate in self.client.adapters():
            self.client.unload(candidate)  # a leftover of an interrupted run
        self.client.load(candidate, str(path))
        try:
            return self.probe(candidate)
        finally:
            self.client.unload(candidate)

    def _swap(self, name: str, path: Path) -> Probe:
        self.client.load(name, str(path), inplace=True)
        return self.probe(name)

    def _restore(self, name: str, old: Served, old_probe: Probe) -> str:
        """Put ``old`` back under ``name``; a sentence saying whether its answer is back."""
        last: Exception | None = None
        for _ in range(_ROLLBACK_ATTEMPTS):
            try:
                back = self._swap(name, Path(old.path))
            except (VllmError, OperationError) as exc:
                last = exc
                continue
            if back.same(old_probe):
                return f"rolled back to version {old.version}, which answers as before"
            last = OperationError("its answer differs from before")
        raise OperationError(
            f"rollback of {name} to version {old.version} FAILED ({last}); {name} is in an "
            "unknown state: check `adapters list` and run `adapters reconcile`",
            changed=True,
        )

    def _replace(
        self, op: str, name: str, old: Served, new_version: str, new_path: Path,
        on_staged: Callable[[], None] | None,
    ) -> Probe:
        """Swap ``name`` from ``old`` to ``new_path`` in place; roll back on any failure."""
        old_probe = self.probe(name)
        base = self.probe(self.spec.model.served_name)
        expected = self._expected(name, new_version, new_path)
        if expected.same(old_probe):
            raise OperationError(
                f"version {new_version} of {name} answers exactly like the serving version "
                f"{old.version}: its weights do not change the answer; nothing changed"
            )
        if expected.same(base):
            raise OperationError(
                f"version {new_version} of {name} answers like the base model: its weights "
                "have no effect; nothing changed"
            )
        if on_staged is not None:
            on_staged()
        self.say(f"{op} {name}: swapping {old.version} -> {new_version} in place")
        reason = ""
        try:
            actual = self._swap(name, new_path)
        except (VllmError, OperationError) as exc:
            reason = f"vLLM could not load it in place: {exc}"
        else:
            if actual.same(old_probe):
                reason = "vLLM reported the load but the old version still answers"
            elif not actual.same(expected):
                reason = (f"its answer {actual.text!r} is not the one version {new_version} gave "
                          f"when tried alone ({expected.text!r})")
            else:
                return actual
        restored = self._restore(name, old, old_probe)
        try:
            note = self._went_live_in_place(name, old, old_probe)
        except (OperationError, VllmError) as exc:
            note = f"settling it afterwards failed: {exc.message}"
        raise OperationError(
            f"{op} of {name} to version {new_version} failed: {reason}; {restored}; {note}",
            rolled_back=True,
        )

    # --- operations -------------------------------------------------------------------------

    def add(self, name: str, version: str, source: Path | None = None) -> Outcome:
        self._check_name(name)
        self._check_version(version)
        with self.store.locked():
            record = self.record()
            entry = record.entry(name)
            if entry and entry.current:
                raise OperationError(
                    f"{name} already serves version {entry.current.version}; use "
                    f"`adapters hotfix {name} {version}` to replace it"
                )
            if name in self.client.adapters():
                raise OperationError(f"{name} is already loaded on {self.client.base_url} "
                                     "though the record has it removed; run `adapters reconcile`")
            path = self._install(name, version, source)
            base = self.probe(self.spec.model.served_name)
            self.client.load(name, str(path))
            try:
                probe = self.probe(name)
            except (VllmError, OperationError) as exc:
                self._undo_load(name)
                raise OperationError(f"{name} loaded but its probe failed ({exc}); unloaded, "
                                     "nothing changed") from None
            if probe.same(base):
                self._undo_load(name)
                raise OperationError(
                    f"{name} {version} loaded but the base model still answers (identical "
                    "probe); unloaded again, nothing changed"
                )
            served = Served(version, str(path), self._sha(path), probe.to_json(), time.time())
            try:
                self._publish(name, served)
            except OperationError:
                self._undo_load(name)
                raise
            self.store.save(record.set_current(name, served, op="add"))
        return Outcome("add", name, f"{name} now serves version {version}", version, probe)

    def _undo_load(self, name: str) -> None:
        try:
            self.client.unload(name)
        except VllmError as exc:
            raise OperationError(f"{name}: undoing the load failed too: {exc}",
                                 changed=True) from None

    def _live_entry(self, name: str) -> tuple[Record, Entry, Served]:
        record = self.record()
        entry = record.entry(name)
        if entry is None or entry.current is None:
            raise OperationError(f"{name} serves no version (see `adapters list`); "
                                 f"use `adapters add {name} VERSION`")
        if name not in self.client.adapters():
            raise OperationError(f"{name} is in the record but not loaded on "
                                 f"{self.client.base_url}; run `adapters reconcile` first")
        return record, entry, entry.current

    def hotfix(
        self, name: str, version: str, source: Path | None = None, *,
        on_staged: Callable[[], None] | None = None,
    ) -> Outcome:
        """Replace the weights behind ``name`` with ``version`` in place, verified by answers.

        ``on_staged`` runs after the new version was probed on its own and before the swap
        (tests use it to break the weights in between, as a changing disk would).
        """
        self._check_name(name)
        self._check_version(version)
        with self.store.locked():
            record, _entry, old = self._live_entry(name)
            if version == old.version:
                raise OperationError(f"{name} already serves version {version}; nothing changed")
            path = self._install(name, version, source)
            started = time.monotonic()
            probe = self._replace("hotfix", name, old, version, path, on_staged)
            live = time.monotonic()
            served = Served(version, str(path), self._sha(path), probe.to_json(), time.time(),
                            settled=False)
            self.store.save(record.set_current(name, served, op="hotfix"))
            note = self._went_live_in_place(name, served, probe)
        return Outcome("hotfix", name, f"{name} now serves version {version} (was "
                       f"{old.version}); {note}", version, probe,
                       live_s=live - started, settle_s=time.monotonic() - live)

    def rollback(self, name: str, *, on_staged: Callable[[], None] | None = None) -> Outcome:
        self._check_name(name)
        with self.store.locked():
            record, entry, current = self._live_entry(name)
            prev = entry.previous()
            if prev is None:
                raise OperationError(f"{name} has no earlier version to roll back to "
                                     f"(serving {current.version}); nothing changed")
            path = Path(prev.path)
            self._check_folder(path, prev.sha256 or None)
            started = time.monotonic()
            probe = self._replace("rollback", name, current, prev.version, path, on_staged)
            live = time.monotonic()
            refreshed = Served(prev.version, prev.path, prev.sha256, probe.to_json(), time.time(),
                               settled=False)
            self.store.save(record.roll_back(name).updated(name, refreshed))
            note = self._went_live_in_place(name, refreshed, probe)
        return Outcome("rollback", name, f"{name} back on version {prev.version} (was "
                       f"{current.version}); {note}", prev.version, probe,
                       live_s=live - started, settle_s=time.monotonic() - live)

    def _idle(self, name: str, deadline_s: float) -> bool:
        """Whether no request ran or waited on ``name`` (per /metrics) for a whole
        ``_DRAIN_IDLE_SECONDS`` within ``deadline_s``.

        vLLM updates ``vllm:lora_requests_info`` from the engine's output loop, which can lag
        a request that has just started streaming. Idle therefore has to hold for a whole
        window of polls, not for one sample.
        """
        end = time.monotonic() + deadline_s
        idle_since: float | None = None
        while True:
            activity = self.client.lora_activity()
            now = time.monotonic()
            if activity.busy(name):
                idle_since = None
            else:
                idle_since = now if idle_since is None else idle_since
                seen = activity.last_seen.get(name)
                if seen is not None:
                    # A short request can run between two polls; the gauge still has the
                    # time of its last engine step (vLLM's clock: the tools run on its host).
                    idle_since = max(idle_since, now - max(0.0, time.time() - seen))
                if now - idle_since >= _DRAIN_IDLE_SECONDS:
                    return True
            if now >= end:
                return False
            time.sleep(_DRAIN_POLL_SECONDS)

    def _drain(self, name: str, deadline_s: float) -> None:
        if not self._idle(name, deadline_s):
            raise OperationError(
                f"{name} was not idle for {_DRAIN_IDLE_SECONDS:g} s within {deadline_s:g} s "
                "(vllm:lora_requests_info shows running or waiting requests); nothing "
                "changed, try again or raise --deadline"
            )

    def _unload_checked(self, name: str, deadline_s: float) -> None:
        self._drain(name, deadline_s)
        # Entry first: with it in place, the resolver would load the name again on the next
        # request after the unload.
        self._withdraw(name)
        self.client.unload(name)
        try:
            self.client.complete(name, PROBE_PROMPT, max_tokens=1)
        except VllmError as exc:
            if exc.kind == "unknown_adapter":
                return
            raise
        raise OperationError(f"vLLM still answers for {name} after unloading it",
                             changed=True)

    def remove(self, name: str, *, deadline_s: float = REMOVE_DEADLINE_SECONDS) -> Outcome:
        self._check_name(name)
        with self.store.locked():
            record = self.record()
            entry = record.entry(name)
            loaded = name in self.client.adapters()
            if (entry is None or entry.current is None) and not loaded:
                raise OperationError(f"{name} is neither recorded nor loaded; nothing changed")
            if loaded:
                self._unload_checked(name, deadline_s)
            if entry is not None and entry.current is not None:
                self.store.save(record.remove(name))
        note = "" if loaded else " (it was not loaded)"
        return Outcome("remove", name, f"{name} removed{note}; it answers 404 now")

    def settle(self, names: list[str] | None = None, *,
               wait_s: float | None = None) -> Outcome:
        """Settle names loaded in place (all the record has unsettled, or ``names``)."""
        wait = self.settle_wait_s if wait_s is None else wait_s
        actions: list[str] = []
        with self.store.locked():
            record = self.record()
            serving = record.serving()
            for name in names or []:
                self._check_name(name)
                if name not in serving:
                    raise OperationError(f"{name} serves no version (see `adapters list`); "
                                         "nothing changed")
            loaded = self.client.adapters()
            todo = names or [n for n, s in serving.items() if not s.settled]
            for name in todo:
                served = serving[name]
                if not self._loaded_as(name, loaded.get(name), served):
                    raise OperationError(f"{name} is not loaded as version {served.version}; "
                                         "run `adapters reconcile`, which settles too")
                if served.settled:
                    actions.append(f"{name} {served.version} was settled already")
                    continue
                self._publish(name, served)
                probe = self.probe(name)
                if not self._settle(name, served, probe, wait):
                    raise OperationError(f"{name}: {self._deferred(name, wait)}; nothing changed")
                record = record.updated(name, replaced(served, probe=probe.to_json(),
                                                       settled=True))
                self.store.save(record)
                actions.append(f"settled {name} {served.version}")
        message = "; ".join(actions) if actions else "nothing was loaded in place"
        return Outcome("settle", ",".join(todo) or "*", message, actions=tuple(actions))

    def reconcile(self, *, deadline_s: float = REMOVE_DEADLINE_SECONDS) -> Outcome:
        """Make the loaded set equal the record (spec adapters where the record is silent),
        the resolver folder equal the record, and settle what was loaded in place."""
        actions: list[str] = []
        problems: list[str] = []
        with self.store.locked():
            want = self.record().serving()
            root = self._resolver()
            if root is not None:
                # Entries first: a name unloaded or reloaded below is found there meanwhile.
                actions += lora_resolver.sync(root, want, self.layout.model_path(self.spec))
            loaded = self.client.adapters()
            for name in sorted(loaded):
                if name.startswith(CANDIDATE_PREFIX):
                    self.client.unload(name)
                    actions.append(f"unloaded leftover {name}")
                elif name not in want:
                    self._unload_checked(name, deadline_s)
                    actions.append(f"unloaded {name} (removed in the record)")
            base = self.probe(self.spec.model.served_name) if want else None
            for name, served in want.items():
                if self._loaded_as(name, loaded.get(name), served):
                    verb = None
                elif name in loaded:
                    self.client.load(name, served.path, inplace=True)
                    served = replaced(served, settled=False)
                    verb = f"reloaded {name} {served.version} in place"
                else:
                    self.client.load(name, served.path)
                    served = replaced(served, settled=True)
                    verb = f"loaded {name} {served.version}"
                probe = self.probe(name)
                recorded = Probe.from_json(served.probe)
                if base is not None and probe.same(base):
                    problems.append(f"{name} answers like the base model")
                elif recorded is not None and not probe.same(recorded):
                    problems.append(f"{name} {served.version} answers {probe.text!r}, the "
                                    f"record says {recorded.text!r}")
                elif not served.settled:
                    self.store.save(self.record().updated(name, served))
                    note = self._went_live_in_place(name, served, probe)
                    verb = f"{verb}; {note}" if verb else f"{name} {served.version}: {note}"
                elif verb:
                    self.store.save(self.record().updated(name, served))
                if verb:
                    actions.append(verb)
        if problems:
            raise OperationError("reconcile: " + "; ".join(problems), changed=bool(actions))
        message = "; ".join(actions) if actions else "already in sync"
        return Outcome("reconcile", "*", message, actions=tuple(actions))


def _settle_window(wait_s: float) -> float:
    """A settle wait shorter than one whole idle window could never see a pause."""
    return max(wait_s, _DRAIN_IDLE_SECONDS + _DRAIN_POLL_SECONDS)
