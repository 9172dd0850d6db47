"""Adapter operations at runtime: add, hotfix, rollback, remove, settle, reconcile, list.

Each operation is checked by what the model answers, not by vLLM's status codes (vLLM has
been seen to report an adapter loaded while the base model still answers, and to leave an
unloaded adapter in its slot). The check (``serving.adapters.answer``) decides which of the known
candidates answers under a name (the version expected, the version before it, the base model)
from teacher-forced scores of fixed texts, with a margin above each candidate's measured
repeat noise: on a GPU the LoRA path is not run-to-run deterministic, so equality cannot work.

Every operation ends in a verified, recorded state. When a swap fails, the old version is put
back in place and verified; when that fails too, by a plain unload and load (the resolver
covers requests in between); when even that cannot be verified, the record marks the version
unverified and the message says what answers instead.

A failed load can harm more than its own name: vLLM CPU 0.32, once a request had used NaN
weights, answered 400 for every model on that prompt (the base model too) until they were
unloaded. So after any failed load the base model and every other loaded name must answer
as recorded (the base model's answer is kept in the record); if they do not, the server is
restarted where the tools can (``restart``: the local target) and reconciled, else the
message says how to restart it, and every name is marked unverified.

Each operation runs under an intent written before it changes anything
(``serving.adapters.journal``): one cut after a change says what the record holds and that
``adapters reconcile`` comes next, and the next command refuses to run until it has.

The record (``serving.adapters.record``) says which version serves under each name; the
spec's adapters are the starting point for names the record has not seen yet.

Hotfix and rollback swap weights with vLLM's in-place load: the name never stops answering.
vLLM before 0.33.0 then re-reads those weights on every engine step until the name is loaded
again without ``load_inplace`` (-93% tokens/s on an H200); "settling" does that (unload +
load) at a pause in the adapter's requests, with vLLM's filesystem resolver
(``serving.adapters.resolver``) answering requests that arrive in between. Without a pause, the
stack's ``adapterSettle`` decides: ``force`` settles when the wait ends, ``pause`` leaves it
for ``adapters settle``. From vLLM 0.33.0 on, nothing needs settling.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from pathlib import Path
from typing import Any

from serving.adapters import resolver as lora_resolver
from serving.adapters.answer import (
    GREEDY_PROMPT,
    GREEDY_TOKENS,
    REFERENCE_SAMPLES,
    SCORE_TEXTS,
    CheckError,
    Indistinct,
    Reference,
    Scores,
    Verdict,
    decide,
    distinct,
    noise_floor,
    parse_greedy,
    parse_scores,
    separation,
)
from serving.adapters.checks import WEIGHTS_FILE, base_dims, check_adapter
from serving.adapters.client import VllmClient, VllmError
from serving.adapters.journal import WatchedClient, cut_reason, is_cut
from serving.adapters.record import Entry, Intent, Record, RecordError, RecordStore, Served
from serving.adapters.weights import write_zero_adapter
from serving.atomic import replace_folder
from serving.stack.catalog import EXAONE_MODELS, inplace_load_sticks
from serving.stack.digest import DigestError, folder_digest
from serving.stack.layout import Layout, resolver_dir
from serving.stack.spec import Spec, name_problem, version_problem

# A greedy answer to a fixed prompt: shown to operators (and compared by the CPU tests, where
# it is deterministic); decisions use the answer check.
PROBE_PROMPT = GREEDY_PROMPT
PROBE_MAX_TOKENS = GREEDY_TOKENS
MATCH_TOLERANCE = 0.05
BASE = "the base model"
# Runtime-loaded names that hold a version under test. vLLM accepts any name; adapter names
# cannot start with "_", so these never collide with a real adapter.
CANDIDATE_PREFIX = "_candidate."
# vLLM CPU 0.32 computes a base-model request that shares a batch with any adapter's request
# with the adapter in the engine's last LoRA slot: its torch LoRA ops index the stacked LoRA
# weights with -1 for "no adapter", which torch reads as the last slot (lora/ops/torch_ops:
# ``lora_b_weights[lora_indices_tensor]``; its GPU kernels skip -1). Seen under three clients'
# traffic: 11 of 15 greedy answers of the base model came out as some adapter's, while adapter
# requests answered exactly, and so did a zero-weights adapter (20 of 20 equal to the base model
# answering alone). So on the CPU build the base model is observed through an adapter whose
# weights are all zero (base + 0.0, through the LoRA path that is right in mixed batches),
# loaded under this name only while it is observed. Every name starting with "_" is the
# tools' own (adapter names cannot start with it).
BASE_OBSERVER = "_observer.base"
BASE_OBSERVER_FOLDER = "base-observer"
INTERNAL_PREFIX = "_"
REMOVE_DEADLINE_SECONDS = 60.0
# How long hotfix/rollback/reconcile wait for a pause in an adapter's requests to settle it.
SETTLE_WAIT_SECONDS = 15.0
_DRAIN_POLL_SECONDS = 0.25
_DRAIN_IDLE_SECONDS = 1.0  # idle must hold this long: the metric can lag a new request
_ROLLBACK_ATTEMPTS = 2


def version_label(version: str) -> str:
    return f"version {version}"


class OperationError(Exception):
    """An operation did not complete. ``changed`` says whether anything was left changed."""

    def __init__(self, message: str, *, changed: bool = False, rolled_back: bool = False):
        super().__init__(message)
        self.message = message
        self.changed = changed
        self.rolled_back = rolled_back


@dataclass(frozen=True)
class Probe:
    """A model's greedy answer to the probe prompt: tokens and their logprobs (for display;
    on a GPU it is not repeatable, see ``serving.adapters.answer``)."""

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
    settle_policy: str | None = None  # "force" or "pause"; None: the stack's adapterSettle
    # Restarts the server, where the tools can (the local target): after a failed load left
    # the engine answering wrongly. Elsewhere ``restart_hint`` says how, for the message.
    restart: Callable[[], None] | None = None
    restart_hint: str = "restart the vLLM service"
    _base_before: Reference | None = field(default=None, init=False, repr=False)
    _observing: bool = field(default=False, init=False, repr=False)

    # --- the journal of an operation (serving.adapters.journal) ----------------------------

    def _serial(self) -> int | None:
        try:
            return self.store.load().serial
        except RecordError:
            return None

    def _refuse_pending(self, op: str) -> None:
        pending = self.store.pending()
        if pending is None or op == "reconcile":
            return
        why = pending.problem or "it was cut off"
        raise OperationError(f"an earlier `{pending.command}` did not end verified ({why}); "
                             "run `adapters reconcile` first: it brings vLLM to the record, "
                             "verifies it and clears this; nothing changed")

    def recorded_state(self, name: str) -> str:
        """What the record says about ``name``, for messages after a cut."""
        try:
            entry = self.store.load().entry(name)
        except RecordError as exc:
            return f"the record is unreadable ({exc})"
        current = entry.current if entry else None
        if current is None:
            return f"the record has no version serving under {name}"
        facts = [f for f, on in (("loaded in place, not settled", not current.settled),
                                 ("unverified", not current.verified)) if on]
        more = f" ({', '.join(facts)})" if facts else ""
        return f"the record says {name} serves version {current.version}{more}"

    @contextlib.contextmanager
    def _operation(self, op: str, name: str, version: str | None = None) -> Iterator[None]:
        """Run one operation under its intent (held with the lock): see the journal module."""
        self._refuse_pending(op)
        self._base_before = None
        intent = Intent(op, name, version, time.time())
        serial = self._serial()
        self.store.begin(intent)
        watched = WatchedClient(self.client)
        self.client = watched  # type: ignore[assignment]
        try:
            yield
        except OperationError as exc:
            self.client = watched.inner
            final = exc
            if watched.loads_sent and not exc.changed:
                final = self._checked_after(exc)
            if final.changed:
                self.store.begin(replaced(intent, problem=final.message))
            else:
                self.store.end()
            if final is exc:
                raise
            raise final from None
        except BaseException as exc:
            self.client = watched.inner
            changed = watched.changed or self._serial() != serial
            if not is_cut(exc):  # vLLM answered with a refusal
                worse = self._checked_after(exc) if watched.loads_sent else exc
                if worse is not exc:
                    if worse.changed:
                        self.store.begin(replaced(intent, problem=worse.message))
                    else:
                        self.store.end()
                    raise worse from None
                if not changed:
                    self.store.end()
                    raise
            elif not changed:
                self.store.end()
                raise
            why = cut_reason(exc)
            self.store.begin(replaced(intent, problem=why))
            raise OperationError(
                f"`{intent.command}` stopped after it had changed the server ({why}); "
                f"{self.recorded_state(name)}; run `adapters reconcile` (once vLLM answers): "
                "it brings vLLM to the record and verifies every name", changed=True,
            ) from None
        else:
            self.store.end()
        finally:
            self.client = watched.inner

    # --- after a failed load: is the rest of the server still answering as before? ---------

    def _damage(self, skip: set[str]) -> list[str]:
        """Names (the base model first) that no longer answer as recorded; [] when all do.

        A load that fails inside vLLM, or weights that load and then compute NaN, have been
        seen to leave every model on the server answering empty strings until a restart
        (vLLM CPU 0.32: the engine's shared LoRA buffers hold the bad values)."""
        damaged: list[str] = []
        record = self.record()
        base_name = self.spec.model.served_name
        checks: list[tuple[str, str, Reference | None]] = [
            (base_name, BASE, self._base_reference(record))]
        loaded = self.client.adapters()  # unreachable: no judgement, the caller's error stands
        for name, served in record.serving().items():
            if name in skip or name not in loaded:
                continue
            label = version_label(served.version)
            checks.append((name, f"{name} {label}", Reference.from_json(label, served.probe)))
        for model, what, ref in checks:
            try:
                if ref is None:
                    self.scores(model)  # at least a real answer
                    continue
                verdict = self.identify(model, [ref], floor=ref.noise)
            except VllmError as exc:
                if exc.kind == "unreachable":
                    raise
                damaged.append(f"{what} does not answer ({exc.message})")
                continue
            except OperationError as exc:
                damaged.append(f"{what} does not answer ({exc.message})")
                continue
            if not verdict.is_(ref.label):
                damaged.append(f"{what} no longer answers as recorded ({verdict.describe()})")
        return damaged

    def _checked_after(self, exc: BaseException) -> Any:
        """``exc``, or the OperationError that replaces it when the failed load harmed the
        server (``_after_failed_load``)."""
        try:
            self._after_failed_load(exc)
        except OperationError as worse:
            return worse
        except VllmError:
            pass  # vLLM cannot be asked now: the operation's own error says what to run
        return exc

    def _base_key(self) -> str:
        """What the base model's recorded answer holds for: the model and the vLLM."""
        model = self.spec.model
        return f"{model.id}@{model.revision or '-'} on vLLM {self.spec.vllm.version}"

    def _base_reference(self, record: Record) -> Reference | None:
        if self._base_before is not None:
            return self._base_before
        data = record.base or {}
        if data.get("for") != self._base_key():
            return None  # another model or vLLM: that answer says nothing about this one
        return Reference.from_json(BASE, data.get("reference"))

    def _after_failed_load(self, exc: BaseException) -> None:
        """After a failed load: nothing else may have changed. Restart the server where the
        tools can and verify again; else say exactly what to do. Returns when all is well."""
        failed = getattr(exc, "message", str(exc))
        damaged = self._damage(skip=set())
        if not damaged:
            return
        harm = "; ".join(damaged)
        self.say(f"after the failed load: {harm}")
        if self.restart is not None:
            self.say("restarting vLLM, then loading the record's adapters again")
            try:
                self.restart()
                self._reconcile_locked(REMOVE_DEADLINE_SECONDS, check_base=False)
                still = self._damage(skip=set())
            except (OperationError, VllmError) as again:
                still = [getattr(again, "message", str(again))]
            if not still:
                raise OperationError(
                    f"{failed}; that load left the server damaged ({harm}): vLLM was "
                    "restarted, the record's adapters loaded again and every name verified",
                    rolled_back=True) from None
            harm = "; ".join(still)
        self._mark_all_unverified()
        raise OperationError(
            f"{failed}; after that failed load {harm}. vLLM's engine is damaged: "
            f"{self.restart_hint}, then run `adapters reconcile` (every name is marked "
            "unverified until then)", changed=True) from None

    def _mark_all_unverified(self) -> None:
        try:
            record = self.record()
        except OperationError:
            return
        for name, served in record.serving().items():
            record = record.updated(name, replaced(served, verified=False))
        self.store.save(record)

    def _learnt_base(self, base: Reference) -> Reference:
        """Note ``base`` (taken before this operation loads anything) as the base model's
        answer to compare with after a failed load; returns it."""
        self._base_before = base
        return base

    def _with_base(self, record: Record) -> Record:
        """``record`` carrying the base model's answer learnt by this operation."""
        if self._base_before is None:
            return record
        return replaced(record, base={"for": self._base_key(),
                                      "reference": self._base_before.to_json()})

    # --- reading ------------------------------------------------------------------------

    def _stored(self) -> Record:
        """The record as stored; OperationError (nothing changed) when it is damaged."""
        try:
            return self.store.load()
        except RecordError as exc:
            raise OperationError(str(exc)) from None

    def record(self) -> Record:
        """The record, with the spec's adapters filled in for names it has not seen."""
        record = self._stored()
        entries = dict(record.entries)
        for adapter in self.spec.adapters:
            if adapter.name not in entries:
                entries[adapter.name] = Entry(adapter.name, Served(
                    adapter.version, self.layout.adapter_path(self.spec, adapter),
                    adapter.sha256,
                ))
        return replaced(record, entries=entries)

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
        pending = self.store.pending()
        names = sorted(set(record.entries) | set(loaded))
        rows = []
        for name in names:
            entry = record.entries.get(name)
            current = entry.current if entry else None
            cut = pending is not None and pending.name in ("", name)
            rows.append({
                "name": name,
                "version": current.version if current else None,
                "history": [h.version for h in entry.history] if entry else [],
                "loaded": name in loaded,
                "path": loaded.get(name) or (current.path if current else ""),
                # In sync: loaded as recorded, verified, and no operation on it was cut.
                "in_sync": (name in loaded) == (current is not None) and not cut
                and (current is None or (current.verified
                                         and self._loaded_as(name, loaded.get(name), current))),
                "settled": current.settled if current else True,
                "verified": current.verified if current else True,
            })
        return rows

    # --- input checks (nothing has changed when these fail) ---------------------------------

    def _check_name(self, name: str) -> None:
        if name == self.spec.model.served_name:
            raise OperationError(
                f"{name!r} is the base model's name (servedModelName); allowed: any other name"
            )
        problem = name_problem(name)
        if problem:
            raise OperationError(f"adapter name {problem}")

    def _check_version(self, version: str) -> None:
        problem = version_problem(version)
        if problem:
            raise OperationError(f"version {problem}")

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

    def _install(self, name: str, version: str, source: Path | None) -> tuple[Path, bool]:
        """Check the new version's folder and put it at its place; versions are immutable.
        Returns the folder and whether this call created it."""
        dest = self.version_path(name, version)
        if source is None:
            if not dest.is_dir():
                raise OperationError(
                    f"{dest} does not exist; pass --from FOLDER with version {version} of {name}"
                )
            self._check_folder(dest)
            return dest, False
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
            return dest, False
        return replace_folder(
            dest, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True)
        ), True

    def _same_files(self, path: Path, serving: Served) -> str:
        """Why ``path`` cannot replace ``serving`` (it holds the very same files); empty when
        it can. Answers would match and the answer check would blame the weights."""
        digest = self._sha(path)
        if digest and digest == (serving.sha256 or self._sha(Path(serving.path))):
            return (f"holds the same files as the serving version {serving.version} "
                    f"(folder digest {digest[:12]})")
        return ""

    def _sha(self, path: Path) -> str:
        try:
            return folder_digest(path)
        except (DigestError, OSError):
            return ""

    # --- the resolver folder and settling --------------------------------------------------

    def _resolver(self) -> Path | None:
        folder = resolver_dir(self.spec, self.layout)
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

    @property
    def settle_needed(self) -> bool:
        """vLLM before 0.33.0 keeps re-reading an adapter loaded in place (catalog)."""
        return inplace_load_sticks(self.spec.vllm.version)

    def _settle(self, name: str, served: Served, ref: Reference, wait_s: float, *,
                force: bool) -> bool:
        """Load ``name`` again without ``load_inplace``, at a pause in its requests.

        False, and nothing done, when there is no resolver folder to answer requests that
        arrive between unload and load, or when no pause of ``_DRAIN_IDLE_SECONDS`` came
        within ``wait_s`` and ``force`` is off. With ``force`` the settle happens when the wait
        ends: a request that passed vLLM's model check in the same few milliseconds before
        the unload can then miss the name (vLLM looks it up twice, with the tokenizer in
        between); requests that arrive after the unload are loaded by the resolver.
        """
        if self._resolver() is None or wait_s <= 0:
            return False
        if not self._idle(name, _settle_window(wait_s)) and not force:
            return False
        self.client.unload(name)
        try:
            self.client.load(name, served.path)
        except VllmError as exc:
            # already_loaded: a request in between made the resolver load the name's entry,
            # which points at the same version. Anything else: the check below is a request
            # too, so the resolver loads it, or the check fails and says so.
            if exc.kind != "already_loaded":
                self.say(f"settle {name}: loading it again failed ({exc.message}); "
                         "the resolver entry should answer")
        base = self.reference(self.spec.model.served_name, BASE)
        candidates = self._told_apart([ref, base], ref.noise)
        try:
            verdict = self.identify(name, candidates, floor=ref.noise)
        except VllmError as exc:
            verdict = None
            why = f"it does not answer after loading it again ({exc.message})"
        else:
            why = verdict.describe()
        if verdict is not None and verdict.is_(ref.label):
            return True
        self._reload_plain(name, served, ref, candidates, ref.noise, why=why)
        return True

    def _after_inplace(self, name: str, served: Served, ref: Reference) -> str:
        """``served`` was just loaded in place under ``name`` and verified: point its resolver
        entry at it, settle it where the pinned vLLM needs that, and record whether it is
        settled; a phrase for the outcome.

        Callers that change the record (hotfix, rollback, reconcile) have saved ``served``
        as unsettled first, so a cut run leaves the truth behind.
        """
        self._publish(name, served)
        if not self.settle_needed:
            settled = True
            note = (f"nothing to settle (vLLM {self.spec.vllm.version} clears the in-place "
                    "flag after the load)")
        else:
            settled = self._settle(name, served, ref, self.settle_wait_s,
                                   force=self.force_settle)
            note = "settled" if settled else self._deferred(name, self.settle_wait_s)
        self._mark(name, served.version, settled=settled, verified=True)
        return note

    def _mark(self, name: str, version: str, **facts: bool) -> None:
        """Record facts about the version ``name`` serves, when the record says it serves
        ``version`` (an automatic rollback leaves the record alone otherwise)."""
        record = self.record()
        entry = record.entries.get(name)
        current = entry.current if entry else None
        if current is None or current.version != version:
            return
        updated = replaced(current, **facts)
        if updated != current:
            self.store.save(record.updated(name, updated))

    @property
    def force_settle(self) -> bool:
        return (self.settle_policy or self.spec.vllm.adapter_settle) == "force"

    def _deferred(self, name: str, wait_s: float) -> str:
        if self._resolver() is None:
            why = "no resolver folder (VLLM_LORA_RESOLVER_CACHE_DIR) covers the reload"
        elif wait_s <= 0:
            why = "settling was not asked for"
        else:
            why = f"its requests did not pause within {_settle_window(wait_s):g} s"
        return (f"not settled ({why}): vLLM {self.spec.vllm.version} re-reads its weights on "
                f"every step until `adapters settle {name}` runs")

    # --- the answer check -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _asking(self, model: str) -> Iterator[str]:
        """The name to ask for ``model``'s answer: itself, except the base model on vLLM's CPU
        build, which is asked through a zero-weights adapter (``BASE_OBSERVER`` says why),
        loaded for the observations made inside this block and unloaded after."""
        if not (self.spec.vllm.cpu and model == self.spec.model.served_name):
            yield model
            return
        if self._observing:  # an observation inside another one's block
            yield BASE_OBSERVER
            return
        folder = Path(self.layout.state_dir) / BASE_OBSERVER_FOLDER
        if not (folder / WEIGHTS_FILE).is_file():
            write_zero_adapter(folder, self._dims(), self.spec.model.id)
        # Past the operation's watch: loading and unloading the observer changes nothing that
        # serves (a leftover of a cut run is an internal name, which reconcile unloads).
        client = self.client.inner if isinstance(self.client, WatchedClient) else self.client
        try:
            client.load(BASE_OBSERVER, str(folder))
        except VllmError as exc:
            if exc.kind != "already_loaded":  # a leftover of a cut run: the same zero weights
                raise
        self._observing = True
        try:
            yield BASE_OBSERVER
        finally:
            self._observing = False
            with contextlib.suppress(VllmError):  # a leftover is unloaded by reconcile
                client.unload(BASE_OBSERVER)

    def scores(self, model: str) -> Scores:
        """One observation: ``model``'s teacher-forced scores of the fixed texts; on vLLM's
        CPU build, which cannot score prompts with LoRA, the logprobs of its greedy answer to
        one fixed prompt (``serving.adapters.answer.GREEDY_PROMPT`` says why)."""
        with self._asking(model) as asked:
            try:
                if self.spec.vllm.cpu:
                    probe = probe_answer(self.client, asked)
                    return parse_greedy(probe.tokens, probe.logprobs)
                return parse_scores(self.client.score(asked, SCORE_TEXTS), SCORE_TEXTS)
            except CheckError as exc:
                raise OperationError(f"checking what answers as {model!r}: {exc}") from None

    def reference(self, model: str, label: str, samples: int = REFERENCE_SAMPLES) -> Reference:
        """What ``model`` answers now, as a candidate: mean scores and repeat noise. Two
        repeats that agree exactly (the CPU, or the base model on a GPU) are enough; noisy
        ones get ``samples`` in all, so their noise is measured."""
        with self._asking(model) as asked:
            taken = [self.scores(asked), self.scores(asked)]
            if taken[0].distance(taken[1]) != 0.0:
                taken += [self.scores(asked) for _ in range(samples - len(taken))]
        return Reference.from_samples(label, taken)

    def identify(self, model: str, candidates: list[Reference], *, floor: float) -> Verdict:
        """Which of ``candidates`` answers as ``model`` (``serving.adapters.answer``).
        Candidates must be told apart first (``_told_apart``): between two that answer alike
        no verdict is attempted."""
        with self._asking(model) as asked:
            try:
                return decide(lambda: self.scores(asked), candidates, floor=floor)
            except Indistinct as exc:
                raise OperationError(f"checking what answers as {model!r}: {exc}") from None

    def _told_apart(self, candidates: list[Reference], floor: float) -> list[Reference]:
        """``candidates`` without those that answer like an earlier one (each such pair is
        said): a verdict for the earlier one then means either, which is all that the
        answers can show."""
        kept, twins = distinct(candidates, floor)
        for twin, earlier, distance, needed in twins:
            self.say(f"{twin.label} answers like {earlier.label} (score distance "
                     f"{distance:.3g}, needs more than {needed:.3g} to tell them apart): the "
                     "check takes them as one")
        return kept

    def _require_apart(self, a: Reference, b: Reference, floor: float, what: str) -> None:
        apart, distance, needed = separation(a, b, floor)
        if not apart:
            raise OperationError(
                f"{a.label} {what} (score distance {distance:.3g}, the check needs more than "
                f"{needed:.3g} to tell them apart); nothing changed")

    # --- building blocks ----------------------------------------------------------------------

    def _expected(self, name: str, version: str, path: Path) -> Reference:
        """What ``path`` answers, learnt under a candidate name that is unloaded after."""
        candidate = f"{CANDIDATE_PREFIX}{name}.{version}"
        if candidate in self.client.adapters():
            self.client.unload(candidate)  # a leftover of an interrupted run
        self.client.load(candidate, str(path))
        try:
            return self.reference(candidate, version_label(version))
        finally:
            self.client.unload(candidate)

    def _restore(self, name: str, old: Served, old_ref: Reference,
                 candidates: list[Reference], floor: float) -> str:
        """Put ``old`` back under ``name`` in place and verify it; if that fails, by a plain
        unload and load. A sentence saying what serves; OperationError when ``old`` could
        not be brought back (its message says what answers instead)."""
        why = ""
        for _ in range(_ROLLBACK_ATTEMPTS):
            try:
                self.client.load(name, old.path, inplace=True)
                verdict = self.identify(name, candidates, floor=floor)
            except (VllmError, OperationError) as exc:
                why = getattr(exc, "message", str(exc))
                continue
            if verdict.is_(old_ref.label):
                note = self._after_inplace(name, old, old_ref)
                return f"rolled back to version {old.version}, verified ({note})"
            why = verdict.describe()
        return self._reload_plain(name, old, old_ref, candidates, floor, why=why)

    def _reload_plain(self, name: str, served: Served, ref: Reference,
                      candidates: list[Reference], floor: float, *, why: str) -> str:
        """The last resort: unload ``name`` and load ``served`` plainly (its resolver entry
        covers requests in between), then verify. Records the outcome either way."""
        self.say(f"{name}: bringing version {served.version} back by a plain unload and load "
                 f"({why})")
        self._publish(name, served)
        try:
            self.client.unload(name)
        except VllmError as exc:
            if exc.kind != "unknown_adapter":
                raise OperationError(f"{name}: unloading it failed ({exc.message}); the record "
                                     f"says version {served.version}; run `adapters reconcile`",
                                     changed=True) from None
        try:
            self.client.load(name, served.path)
        except VllmError as exc:
            if exc.kind != "already_loaded":  # else the resolver loaded the same entry
                self.say(f"{name}: loading version {served.version} failed ({exc.message})")
        try:
            verdict = self.identify(name, candidates, floor=floor)
        except (VllmError, OperationError) as exc:
            now = f"it does not answer ({getattr(exc, 'message', exc)})"
        else:
            if verdict.is_(ref.label):
                self._mark(name, served.version, settled=True, verified=True)
                return (f"{name} was brought back to version {served.version} by a plain "
                        "unload and load, verified")
            now = verdict.describe()
        self._mark(name, served.version, verified=False)
        raise OperationError(
            f"{name}: version {served.version} could not be brought back ({why}); after a "
            f"plain unload and load {now}. The record keeps version {served.version}, marked "
            f"unverified; check the server log, then run `adapters reconcile`", changed=True)

    def _replace(
        self, op: str, name: str, old: Served, new_version: str, new_path: Path,
        on_staged: Callable[[], None] | None,
    ) -> Reference:
        """Swap ``name`` from ``old`` to ``new_path`` in place; roll back on any failure.

        The new version is learnt under a candidate name first; after the swap the check
        decides between it, the old version and the base model.
        """
        old_ref = self.reference(name, version_label(old.version))
        base_ref = self._learnt_base(self.reference(self.spec.model.served_name, BASE))
        expected = self._expected(name, new_version, new_path)
        floor = noise_floor([old_ref, expected])
        self._require_apart(expected, old_ref, floor,
                            f"of {name} answers like the serving {old_ref.label}: its weights "
                            "do not change the answer")
        self._require_apart(expected, base_ref, floor,
                            f"of {name} answers like the base model: its weights have no effect")
        if on_staged is not None:
            on_staged()
        self.say(f"{op} {name}: swapping {old.version} -> {new_version} in place")
        # The serving version may answer like the base model (weights that do nothing, being
        # fixed now): then the check cannot tell them apart and takes them as one.
        candidates = self._told_apart([expected, old_ref, base_ref], floor)
        try:
            self.client.load(name, str(new_path), inplace=True)
            verdict = self.identify(name, candidates, floor=floor)
        except (VllmError, OperationError) as exc:
            reason = f"vLLM could not load it in place: {getattr(exc, 'message', exc)}"
        else:
            if verdict.is_(expected.label):
                return expected
            if verdict.is_(old_ref.label):
                reason = f"vLLM reported the load but {old_ref.label} still answers"
            elif verdict.is_(BASE):
                reason = "vLLM reported the load but the base model answers"
            else:
                reason = f"the check could not tell what answers: {verdict.describe()}"
        restored = self._restore(name, old, old_ref, candidates, floor)
        raise OperationError(
            f"{op} of {name} to version {new_version} failed: {reason}; {restored}",
            rolled_back=True,
        )

    # --- operations -------------------------------------------------------------------------

    def add(self, name: str, version: str, source: Path | None = None) -> Outcome:
        self._check_name(name)
        self._check_version(version)
        with self.store.locked(), self._operation("add", name, version):
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
            path, created = self._install(name, version, source)
            try:
                base = self._learnt_base(self.reference(self.spec.model.served_name, BASE))
                self.client.load(name, str(path))
            except (VllmError, OperationError):
                self._discard(path, created)
                raise
            try:
                ref = self.reference(name, version_label(version))
                self._require_apart(ref, base, ref.noise,
                                    f"of {name} answers like the base model: its weights "
                                    "have no effect; unloaded again")
                probe = self.probe(name)
            except (VllmError, OperationError) as exc:
                self._undo_load(name)
                self._discard(path, created)
                message = getattr(exc, "message", str(exc))
                if isinstance(exc, VllmError):
                    message = (f"{name} loaded but checking its answers failed ({message}); "
                               "unloaded, nothing changed")
                raise OperationError(message) from None
            served = Served(version, str(path), self._sha(path), ref.to_json(), time.time())
            try:
                self._publish(name, served)
            except OperationError:
                self._undo_load(name)
                raise
            self.store.save(self._with_base(record).set_current(name, served, op="add"))
        return Outcome("add", name, f"{name} now serves version {version}, verified against "
                       "the base model", version, probe)

    def _discard(self, path: Path, created: bool) -> None:
        """A version folder this operation created and then refused leaves nothing behind,
        so its version number can be used again; unless vLLM may still read it (loaded
        under any name, or recorded as serving): then it stays, and the operation's state
        says so through the record."""
        if not created or self._may_be_read(path):
            return
        shutil.rmtree(path, ignore_errors=True)

    def _may_be_read(self, path: Path) -> bool:
        """vLLM may read ``path`` again: a name is loaded from it (an unsettled one re-reads
        it on every step), or the record serves it; unknown (vLLM unreachable) counts."""
        target = Path(path).resolve()
        try:
            loaded = self.client.adapters().values()
        except VllmError:
            return True
        if any(Path(p).resolve() == target for p in loaded):
            return True
        try:
            serving = self.store.load().serving().values()
        except RecordError:
            return True
        return any(Path(s.path).resolve() == target for s in serving)

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

        ``on_staged`` runs after the new version was learnt on its own and before the swap
        (tests use it to break the weights in between, as a changing disk would).
        """
        self._check_name(name)
        self._check_version(version)
        with self.store.locked(), self._operation("hotfix", name, version):
            record, _entry, old = self._live_entry(name)
            if version == old.version:
                raise OperationError(f"{name} already serves version {version}; nothing changed")
            path, created = self._install(name, version, source)
            same = self._same_files(path, old)
            if same:
                self._discard(path, created)
                raise OperationError(f"version {version} of {name} {same}; nothing changed")
            started = time.monotonic()
            try:
                ref = self._replace("hotfix", name, old, version, path, on_staged)
            except VllmError:  # only raised before the swap: nothing changed
                self._discard(path, created)
                raise
            except OperationError as exc:
                if not exc.changed:  # refused, or rolled back and verified: nothing reads it
                    self._discard(path, created)
                raise
            live = time.monotonic()
            served = Served(version, str(path), self._sha(path), ref.to_json(), time.time(),
                            settled=False)
            self.store.save(self._with_base(record).set_current(name, served, op="hotfix"))
            note = self._after_inplace(name, served, ref)
            probe = self.probe(name)
        return Outcome("hotfix", name, f"{name} now serves version {version} (was "
                       f"{old.version}), verified; {note}", version, probe,
                       live_s=live - started, settle_s=time.monotonic() - live)

    def rollback(self, name: str, *, on_staged: Callable[[], None] | None = None) -> Outcome:
        self._check_name(name)
        with self.store.locked(), self._operation("rollback", name):
            record, entry, current = self._live_entry(name)
            prev = entry.previous()
            if prev is None:
                raise OperationError(f"{name} has no earlier version to roll back to "
                                     f"(serving {current.version}; the record's history is "
                                     "empty, e.g. after a remove and add of the same version); "
                                     "nothing changed")
            if prev.version == current.version:
                raise OperationError(f"{name}: the earlier version on record is {prev.version}, "
                                     "the version serving now (from another folder); nothing "
                                     "to roll back to; nothing changed")
            path = Path(prev.path)
            self._check_folder(path, prev.sha256 or None)
            same = self._same_files(path, current)
            if same:
                raise OperationError(f"{name}: the earlier version {prev.version} {same}; "
                                     "nothing to roll back to; nothing changed")
            started = time.monotonic()
            ref = self._replace("rollback", name, current, prev.version, path, on_staged)
            live = time.monotonic()
            refreshed = Served(prev.version, prev.path, prev.sha256, ref.to_json(), time.time(),
                               settled=False)
            self.store.save(self._with_base(record).roll_back(name).updated(name, refreshed))
            note = self._after_inplace(name, refreshed, ref)
            probe = self.probe(name)
        return Outcome("rollback", name, f"{name} back on version {prev.version} (was "
                       f"{current.version}), verified; {note}", prev.version, probe,
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
        self._prove_gone(name)

    def _prove_gone(self, name: str) -> None:
        """A real request for ``name`` answers 404 (the resolver has no entry to load)."""
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
        with self.store.locked(), self._operation("remove", name):
            record = self.record()
            entry = record.entry(name)
            loaded = name in self.client.adapters()
            root = self._resolver()
            listed = root is not None and (lora_resolver.link(root, name).is_symlink()
                                           or lora_resolver.link(root, name).exists())
            if (entry is None or entry.current is None) and not loaded and not listed:
                raise OperationError(f"{name} is neither recorded nor loaded; nothing changed")
            if loaded:
                self._unload_checked(name, deadline_s)
            else:
                # Not loaded (a restart): its resolver entry would still load it on first use.
                self._withdraw(name)
                self._prove_gone(name)
            if entry is not None and entry.current is not None:
                self.store.save(record.remove(name))
        note = "" if loaded else " (it was not loaded)"
        return Outcome("remove", name, f"{name} removed{note}; it answers 404 now")

    def settle(self, names: list[str] | None = None, *, wait_s: float | None = None,
               force: bool | None = None) -> Outcome:
        """Settle names loaded in place (all the record has unsettled, or ``names``)."""
        wait = self.settle_wait_s if wait_s is None else wait_s
        forced = self.force_settle if force is None else force
        actions: list[str] = []
        with self.store.locked(), self._operation("settle", " ".join(names or [])):
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
                label = version_label(served.version)
                ref = Reference.from_json(label, served.probe) or self.reference(name, label)
                if self.settle_needed and not self._settle(name, served, ref, wait,
                                                           force=forced):
                    raise OperationError(f"{name}: {self._deferred(name, wait)}; nothing changed")
                self._mark(name, served.version, settled=True)
                actions.append(f"settled {name} {served.version}")
        message = "; ".join(actions) if actions else "nothing was loaded in place"
        return Outcome("settle", ",".join(todo) or "*", message, actions=tuple(actions))

    def reconcile(self, *, deadline_s: float = REMOVE_DEADLINE_SECONDS,
                  rebuild: bool = False) -> Outcome:
        """Make the loaded set equal the record (spec adapters where the record is silent),
        the resolver folder equal the record, verify what answers under each name, and settle
        what was loaded in place. ``rebuild``: first rebuild a damaged record from what vLLM
        serves and the folders on disk (``rebuild_record``)."""
        with self.store.locked(), self._operation("reconcile", ""):
            rebuilt: list[str] = self._rebuild_record() if rebuild else []
            outcome = self._reconcile_locked(deadline_s)
        if rebuilt:
            actions = (*rebuilt, *outcome.actions)
            return Outcome("reconcile", "*", "; ".join(actions), actions=actions)
        return outcome

    def _rebuild_record(self) -> list[str]:
        """Rebuild a damaged record: each name vLLM serves from a version folder becomes that
        version (the resolver entry tells which version a resolver-loaded name is); names
        the previous generation served whose folders exist stay; history and recorded
        answers come from the previous generation where the version matches. Everything
        rebuilt is marked unverified, so the reconcile after it verifies each name by its
        answers. [] when the record is readable."""
        try:
            self.store.load()
            return []
        except RecordError as exc:
            damage = str(exc)
        previous = self.store.load_previous() or Record()
        root = self._resolver()
        notes: list[str] = []
        entries: dict[str, Entry] = {}
        for name, path in sorted(self.client.adapters().items()):
            if name.startswith(INTERNAL_PREFIX):
                continue
            version = self._version_loaded(name, path, root)
            if version is None or not self.version_path(name, version).is_dir():
                notes.append(f"{name} is loaded from {path}, not a version folder: left out "
                             "of the record (reconcile unloads it)")
                continue
            entries[name] = self._rebuilt(name, version, previous.entry(name))
        for name, entry in sorted(previous.entries.items()):
            if name in entries:
                continue
            current = entry.current
            if current is not None and self.version_path(name, current.version).is_dir():
                entries[name] = self._rebuilt(name, current.version, entry)
            else:
                entries[name] = Entry(name, None, entry.history)
        record = Record(previous.serial, entries, (*previous.log, {
            "at": time.time(), "op": "rebuild", "name": "*", "from": None, "to": None}),
            previous.base)
        _saved, aside = self.store.replace_damaged(record)
        serving = ", ".join(f"{n} {e.current.version}" for n, e in entries.items() if e.current)
        return [f"rebuilt the record ({damage.split(';')[0]}; the damaged file is kept at "
                f"{aside}): serving {serving or 'no adapters'}", *notes]

    def _version_loaded(self, name: str, path: str, root: Path | None) -> str | None:
        """The version vLLM has loaded under ``name`` from ``path``, when it is one."""
        if root is not None and Path(path) == lora_resolver.link(root, name):
            return lora_resolver.published(root, name)
        resolved = Path(path).resolve()
        for adapter in self.spec.adapters:
            if adapter.name == name and Path(self.layout.adapter_path(
                    self.spec, adapter)).resolve() == resolved:
                return adapter.version
        own = Path(self.layout.adapters_dir, name).resolve()
        if resolved.parent == own and version_problem(resolved.name) is None:
            return resolved.name
        return None

    def _rebuilt(self, name: str, version: str, old: Entry | None) -> Entry:
        """``name`` serving ``version`` from its folder, unverified, with what ``old`` (the
        previous generation's entry) knew of that version."""
        path = self.version_path(name, version)
        sha = self._sha(path)
        known = [s for s in ((old.current,) if old and old.current else ()) + (
            old.history if old else ()) if s.version == version and s.sha256 == sha]
        probe = known[0].probe if known else None
        served = Served(version, str(path), sha, probe, time.time(),
                        settled=not self.settle_needed, verified=False)
        history = tuple(h for h in (old.history if old else ()) if h.version != version)
        return Entry(name, served, history)

    def _reconcile_locked(self, deadline_s: float, *, check_base: bool = True) -> Outcome:
        actions: list[str] = []
        problems: list[str] = []
        record = self.record()
        want, hold, fixes, troubles = self._sane_serving(record)
        actions += fixes
        problems += troubles
        if fixes:
            for name, served in want.items():
                if record.entries[name].current != served:
                    record = record.updated(name, served)
            self.store.save(record)
        root = self._resolver()
        if root is not None:
            # Entries first: a name unloaded or reloaded below is found there meanwhile.
            actions += lora_resolver.sync(root, want, self.layout.model_path(self.spec))
        loaded = self.client.adapters()
        # Before any request: one that runs while vLLM re-reads a missing folder kills it.
        actions += self._keep_vllm_alive(want, hold, loaded, problems)
        for name in sorted(self.client.adapters()):
            if name.startswith(INTERNAL_PREFIX):
                self.client.unload(name)
                actions.append(f"unloaded leftover {name}")
            elif name not in want and name not in hold:
                self._unload_checked(name, deadline_s)
                actions.append(f"unloaded {name} (removed in the record)")
        # After the unknown names are gone: NaN weights loaded under one of them make every
        # model answer 400 ("Out of range float values") until they are unloaded (seen).
        if check_base:
            actions += self._check_base()
        loaded = self.client.adapters()
        base = self._learnt_base(self.reference(self.spec.model.served_name, BASE))
        for name, served in want.items():
            try:
                verb = self._reconcile_one(name, served, loaded.get(name), base)
            except (OperationError, VllmError) as exc:
                problems.append(getattr(exc, "message", str(exc)))
                if self._base_harmed(base):
                    problems.append(self._unload_culprit(name, served))
                continue
            if verb:
                actions.append(verb)
        record = self._stored()
        if self._with_base(record).base != record.base:
            self.store.save(self._with_base(record))
        if problems:
            raise OperationError("reconcile: " + "; ".join(problems), changed=bool(actions))
        message = "; ".join(actions) if actions else "already in sync"
        return Outcome("reconcile", "*", message, actions=tuple(actions))

    def _check_base(self) -> list[str]:
        """Check the base model's answer against the recorded one. One that answers otherwise
        means a damaged engine: restarted where the tools can (then nothing is loaded and
        reconcile goes on from there), else OperationError saying what to do."""
        name = self.spec.model.served_name
        recorded = self._base_reference(self._stored())
        if recorded is None:
            return []
        try:
            verdict = self.identify(name, [recorded], floor=recorded.noise)
        except OperationError as exc:  # e.g. no tokens at all
            harm = f"the base model does not answer ({exc.message})"
        else:
            if verdict.is_(BASE):
                return []
            harm = f"the base model no longer answers as recorded ({verdict.describe()})"
        if self.restart is None:
            self._mark_all_unverified()
            raise OperationError(
                f"reconcile: {harm}. vLLM's engine is damaged: {self.restart_hint}, then run "
                "`adapters reconcile` again (every name is marked unverified until then)",
                changed=True)
        self.say(f"{harm}; restarting vLLM")
        self.restart()
        return [f"restarted vLLM ({harm})"]

    def _base_harmed(self, base: Reference) -> bool:
        """The base model no longer answers as ``base`` (taken before this operation)."""
        try:
            verdict = self.identify(self.spec.model.served_name, [base], floor=base.noise)
        except (OperationError, VllmError):
            return True
        return not verdict.is_(BASE)

    def _unload_culprit(self, name: str, served: Served) -> str:
        """Unload ``name``, whose load just made the base model answer otherwise (NaN
        weights do that once a request uses them); its entry goes too, so no request loads
        it again. A sentence for the problems."""
        self._withdraw(name)
        try:
            self.client.unload(name)
        except VllmError as exc:
            if exc.kind != "unknown_adapter":
                raise
        self._mark(name, served.version, verified=False)
        return (f"{name} was unloaded: with version {served.version} loaded, the base model "
                f"stopped answering as before; check {served.path} (`python -m serving "
                f"check-adapter`), then `adapters hotfix`/`adapters remove {name}`")

    def _allowed_folder(self, name: str, version: str) -> Path:
        return self.version_path(name, version)

    def _sane_serving(self, record: Record
                      ) -> tuple[dict[str, Served], set[str], list[str], list[str]]:
        """The record's serving set as far as it can be loaded: (loadable names, names to
        leave as they are, record fixes made, problems in words).

        A recorded path must be the version's own folder (``<adapters>/<name>/<version>``, or
        the spec's folder for a spec version): a record edited to point elsewhere is put back
        when the version's folder exists, else the name is held. A version whose folder is
        missing cannot be loaded: held, with what to do."""
        want: dict[str, Served] = {}
        hold: set[str] = set()
        fixes: list[str] = []
        problems: list[str] = []
        for name, served in record.serving().items():
            own = self._allowed_folder(name, served.version)
            if Path(served.path).resolve() != own.resolve():
                if own.is_dir():
                    fixes.append(f"record: {name} {served.version} pointed at {served.path}, "
                                 f"not its folder; now {own}")
                    served = replaced(served, path=str(own), verified=False)
                else:
                    hold.add(name)
                    problems.append(
                        f"the record points {name} {served.version} at {served.path}, which "
                        f"is not its folder ({own}, missing); nothing was loaded from there. "
                        f"Put version {served.version} at {own} and run `adapters reconcile`, "
                        f"or run `adapters remove {name}`")
                    continue
            if not Path(served.path).is_dir():
                hold.add(name)
                problems.append(
                    f"{name} {served.version}: its folder {served.path} is missing; put the "
                    f"same files back (sha256 {served.sha256 or 'as recorded'}) and run "
                    f"`adapters reconcile`, or run `adapters remove {name}`")
                continue
            want[name] = served
        return want, hold, fixes, problems

    def _keep_vllm_alive(self, want: dict[str, Served], hold: set[str],
                         loaded: dict[str, str], problems: list[str]) -> list[str]:
        """Unload names that vLLM re-reads from a folder that is gone.

        vLLM before 0.33 re-reads an adapter loaded in place on every engine step; when that
        folder is gone the next request kills the engine (``EngineDeadError``, seen). A name
        loaded from a missing folder is therefore unloaded (its resolver entry was withdrawn
        by the sync before), so that the server keeps answering for every other name."""
        actions = []
        for name, path in sorted(loaded.items()):
            if name.startswith(INTERNAL_PREFIX) or Path(path).exists():
                continue
            if name in want and self._loaded_as(name, path, want[name]):
                continue
            self.client.unload(name)
            actions.append(f"unloaded {name}: vLLM was reading it from {path}, which is gone")
            if name in hold:
                problems.append(f"{name} answers 404 until its folder is back")
        return actions

    def _reconcile_one(self, name: str, served: Served, loaded_path: str | None,
                       base: Reference) -> str | None:
        """Bring one name to its recorded version and verify it; a phrase, or None when it
        was in sync already."""
        label = version_label(served.version)
        if self._loaded_as(name, loaded_path, served):
            verb = None
        elif loaded_path is not None:
            self.client.load(name, served.path, inplace=True)
            served = replaced(served, settled=False)
            verb = f"reloaded {name} {served.version} in place"
        else:
            try:
                self.client.load(name, served.path)
            except VllmError as exc:
                if exc.kind != "already_loaded":  # else a request had the resolver load it
                    raise
            served = replaced(served, settled=True)
            verb = f"loaded {name} {served.version}"
        ref = Reference.from_json(label, served.probe)
        if ref is not None and not separation(ref, base, ref.noise)[0]:
            # Recorded while it answered like the base model (a record written before the
            # base model was observed apart from adapters' traffic): no check can rest on it.
            self.say(f"{name} {label}: its recorded answer is the base model's; learning it "
                     "again")
            ref = None
        if ref is None:  # recorded by an older check: learn it, then it must not be the base
            ref = self.reference(name, label)
            self._require_apart(ref, base, ref.noise,
                                f"of {name} answers like the base model")
            served = replaced(served, probe=ref.to_json())
        else:
            verdict = self.identify(name, [ref, base], floor=ref.noise)
            if not verdict.is_(label):
                verb = self._reload_plain(name, served, ref, [ref, base], ref.noise,
                                          why=verdict.describe())
                served = replaced(served, settled=True)
        fresh = replaced(served, verified=True)
        if self.record().entries[name].current != fresh:
            self.store.save(self.record().updated(name, fresh))
            verb = verb or f"{name} {served.version}: verified"
        if not fresh.settled:
            note = self._after_inplace(name, fresh, ref)
            return f"{verb}; {note}" if verb else f"{name} {served.version}: {note}"
        return verb


def _settle_window(wait_s: float) -> float:
    """A settle wait shorter than one whole idle window could never see a pause."""
    return max(wait_s, _DRAIN_IDLE_SECONDS + _DRAIN_POLL_SECONDS)
