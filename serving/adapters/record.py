"""The record of which adapter version serves under each name, with history.

A small JSON file on the serving host beside the adapters (``<state_dir>/adapters.json``),
written atomically (temp file, fsync, rename). Every operation appends to the log and keeps
the versions a name served before, so each one can be undone. The file carries a schema
number and a serial that grows with every write.

Two more files sit beside it. ``adapters.json.prev`` is the generation before the last
write: a record damaged by hand or by a disk fault is refused, and ``adapters reconcile
--rebuild`` rebuilds it from what vLLM serves and the folders on disk, taking the history
and recorded answers from that generation. ``adapters.intent.json`` is written before an
operation changes anything and removed when it ends in a verified state: when a kill, a
dropped connection or a crash cuts an operation, the next command finds it and says which
operation was cut and what to run (``adapters reconcile``, which clears it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from serving.adapters import safejson
from serving.atomic import write_file
from serving.stack.spec import name_problem, version_problem

SCHEMA = 1
RECORD_FILE = "adapters.json"
PREVIOUS_SUFFIX = ".prev"
INTENT_FILE = "adapters.intent.json"
LOCK_FILE = "adapters.lock"
# A record holds a few names with their history; anything this large is not one.
MAX_RECORD_BYTES = 16 * 1024 * 1024
MAX_RECORD_DEPTH = 16
MAX_INTENT_BYTES = 64 * 1024
LOG_LIMIT = 200  # entries kept in the file's log; history per name is kept whole


class RecordError(ValueError):
    """The record file exists but cannot be used (unreadable, another schema)."""


@dataclass(frozen=True)
class Intent:
    """An operation that has begun changing things and has not ended in a verified state."""

    op: str
    name: str
    version: str | None = None
    at: float = 0.0
    # Set when the operation ended with the server in a state the tools could not verify.
    problem: str = ""

    @property
    def command(self) -> str:
        if not self.op:
            return "adapters operation"  # an intent file that cannot be read
        return " ".join(p for p in ("adapters", self.op, self.name, self.version or "") if p)


@dataclass(frozen=True)
class Served:
    """One version serving under a name: where its weights are and what it answered."""

    version: str
    path: str
    sha256: str = ""
    probe: dict[str, Any] | None = None  # the probe answer recorded when it went live
    at: float = 0.0
    # False after an in-place load until it is loaded again plainly (serving.adapters.resolver
    # says why): until then vLLM re-reads its weights on every engine step.
    settled: bool = True
    # False when, after a failure, no check could tell which weights answer under the name:
    # `adapters list` shows it and `adapters reconcile` checks it again.
    verified: bool = True


def same_step(a: Served, b: Served) -> bool:
    """The same version from the same folder: a removed version that comes back is the step it
    was, not a new one."""
    return a.version == b.version and a.path == b.path


def steps(history: tuple[Served, ...], current: Served | None) -> tuple[Served, ...]:
    """``history`` as distinct steps: no step twice in a row, and none on top that is the one
    serving (rolling back to it would change nothing)."""
    out: list[Served] = []
    for served in history:
        if out and same_step(out[-1], served):
            out[-1] = served
        else:
            out.append(served)
    while current is not None and out and same_step(out[-1], current):
        out.pop()
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """A name: its current version (None once removed) and the versions before it."""

    name: str
    current: Served | None
    history: tuple[Served, ...] = ()

    def previous(self) -> Served | None:
        return self.history[-1] if self.history else None


@dataclass(frozen=True)
class Record:
    serial: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)
    log: tuple[dict[str, Any], ...] = ()
    # The base model's recorded answer (``serving.adapters.answer.Reference.to_json``), to
    # check after a failed load that it still answers as before.
    base: dict[str, Any] | None = None

    def entry(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def serving(self) -> dict[str, Served]:
        """Names that should be loaded now, with their version."""
        return {n: e.current for n, e in sorted(self.entries.items()) if e.current is not None}

    # Each change returns a new Record; nothing is written until `save`.

    def _with(self, entry: Entry, op: dict[str, Any]) -> Record:
        entries = {**self.entries, entry.name: entry}
        log = (*self.log, {"at": time.time(), **op})[-LOG_LIMIT:]
        return replace(self, entries=entries, log=log)

    def set_current(self, name: str, served: Served, *, op: str) -> Record:
        """``served`` becomes current; the version it replaces goes onto the history."""
        old = self.entries.get(name)
        history = old.history if old else ()
        if old and old.current is not None:
            history = (*history, old.current)
        before = old.current.version if old and old.current else None
        return self._with(
            Entry(name, served, steps(history, served)),
            {"op": op, "name": name, "from": before, "to": served.version},
        )

    def roll_back(self, name: str) -> Record:
        """The previous version becomes current again; the current one is dropped."""
        old = self.entries[name]
        prev = old.previous()
        if prev is None or old.current is None:
            raise RecordError(f"{name} has no previous version to roll back to")
        return self._with(
            Entry(name, prev, old.history[:-1]),
            {"op": "rollback", "name": name, "from": old.current.version, "to": prev.version},
        )

    def updated(self, name: str, served: Served) -> Record:
        """The current version of ``name`` replaced by ``served`` (same version, fresher
        facts such as its probe or ``settled``); not an operation, so no log entry."""
        entry = self.entries[name]
        return replace(self, entries={**self.entries, name: Entry(name, served, entry.history)})

    def remove(self, name: str) -> Record:
        """Nothing serves under ``name``; the removed version stays on the history (re-add)."""
        old = self.entries[name]
        history = (*old.history, old.current) if old.current else old.history
        before = old.current.version if old.current else None
        return self._with(
            Entry(name, None, steps(history, None)),
            {"op": "remove", "name": name, "from": before, "to": None},
        )


def _served(data: dict[str, Any]) -> Served:
    problem = version_problem(str(data["version"]))
    if problem:
        raise ValueError(f"version {problem}")
    return Served(
        version=str(data["version"]), path=str(data["path"]), sha256=str(data.get("sha256", "")),
        probe=data.get("probe"), at=float(data.get("at", 0.0)),
        settled=bool(data.get("settled", True)), verified=bool(data.get("verified", True)),
    )


def _served_json(served: Served) -> dict[str, Any]:
    out: dict[str, Any] = {"version": served.version, "path": served.path, "at": served.at}
    if served.sha256:
        out["sha256"] = served.sha256
    if served.probe is not None:
        out["probe"] = served.probe
    if not served.settled:
        out["settled"] = False
    if not served.verified:
        out["verified"] = False
    return out


def to_json(record: Record) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "serial": record.serial,
        "adapters": {
            name: {
                "current": _served_json(e.current) if e.current else None,
                "history": [_served_json(h) for h in e.history],
            }
            for name, e in sorted(record.entries.items())
        },
        "log": list(record.log),
        **({"base": record.base} if record.base is not None else {}),
    }


def _entry(name: str, current: Served | None, history: tuple[Served, ...]) -> Entry:
    # Records written before history kept distinct steps may repeat one: read them as steps.
    return Entry(name, current, steps(history, current))


def from_json(data: Any, *, where: str = RECORD_FILE) -> Record:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise RecordError(f"{where}: schema is {found!r}; this tool reads schema {SCHEMA}")
    try:
        for name in data.get("adapters", {}):
            problem = name_problem(name) if isinstance(name, str) else "is not a string"
            if problem:
                raise ValueError(f"adapter name {problem}")
        entries = {
            name: _entry(name, _served(e["current"]) if e.get("current") else None,
                         tuple(_served(h) for h in e.get("history", [])))
            for name, e in data.get("adapters", {}).items()
        }
        base = data.get("base")
        if base is not None and not isinstance(base, dict):
            raise TypeError("base is not an object")
        return Record(int(data.get("serial", 0)), entries, tuple(data.get("log", [])), base)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"{where}: malformed entry ({type(exc).__name__}: {exc})") from None


class RecordStore:
    """The record file in ``state_dir``; ``locked()`` serialises operations across processes."""

    def __init__(self, state_dir: Path | str):
        self.dir = Path(state_dir)
        self.path = self.dir / RECORD_FILE
        self.previous_path = self.dir / (RECORD_FILE + PREVIOUS_SUFFIX)
        self.intent_path = self.dir / INTENT_FILE

    def load(self) -> Record:
        try:
            return self._read(self.path)
        except RecordError as exc:
            raise RecordError(f"{exc}; run `adapters reconcile --rebuild` to rebuild it from "
                              "what vLLM serves and the adapter folders") from None

    def load_previous(self) -> Record | None:
        """The generation before the last write, or None when there is none usable."""
        try:
            return self._read(self.previous_path) if self.previous_path.exists() else None
        except RecordError:
            return None

    def _read(self, path: Path) -> Record:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return Record()
        except OSError as exc:
            raise RecordError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            raw = safejson.loads(data, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
        except safejson.JsonLimitError as exc:
            raise RecordError(f"{path}: {exc}") from None
        return from_json(raw, where=str(path))

    def save(self, record: Record) -> Record:
        """Write ``record`` with the next serial, atomically; returns what was written. The
        file it replaces becomes the previous generation when it is a readable record."""
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = replace(record, serial=record.serial + 1)
        text = json.dumps(to_json(saved), indent=2, sort_keys=True) + "\n"
        try:
            self._read(self.path)
            old = self.path.read_bytes() if self.path.exists() else None
        except (RecordError, OSError):
            old = None  # a damaged file never replaces a good previous generation
        if old is not None:
            write_file(self.previous_path, old, 0o644)
        write_file(self.path, text.encode(), 0o644)
        return saved

    def replace_damaged(self, record: Record) -> tuple[Record, Path | None]:
        """Write a rebuilt ``record`` over a damaged file, which is kept aside; returns what
        was written and where the damaged file went."""
        aside = None
        if self.path.exists():
            aside = self.dir / f"{RECORD_FILE}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            self.path.rename(aside)
        return self.save(record), aside

    # --- the intent of an operation in progress --------------------------------------------

    def pending(self) -> Intent | None:
        """The operation a cut run left behind, or None."""
        try:
            with open(self.intent_path, "rb") as handle:
                data = safejson.loads(handle.read(MAX_INTENT_BYTES + 1),
                                      max_bytes=MAX_INTENT_BYTES, max_depth=2)
            version = data.get("version")
            if not (isinstance(data["op"], str) and isinstance(data["name"], str)):
                raise TypeError("op and name are not strings")
            return Intent(data["op"], data["name"],
                          None if version is None else str(version),
                          float(data.get("at", 0.0)), str(data.get("problem", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return Intent("", "", problem=f"{self.intent_path} is unreadable")

    def begin(self, intent: Intent) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"op": intent.op, "name": intent.name, "version": intent.version,
                "at": intent.at or time.time(), "problem": intent.problem}
        write_file(self.intent_path, (json.dumps(data) + "\n").encode(), 0o644)

    def end(self) -> None:
        self.intent_path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the operations lock; a second operation waits instead of interleaving."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
