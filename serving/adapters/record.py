"""The record of which adapter version serves under each name, with history.

A small JSON file on the serving host beside the adapters (``<state_dir>/adapters.json``),
written atomically (temp file, fsync, rename). Every operation appends to the log and keeps
the versions a name served before, so each one can be undone. The file carries a schema
number and a serial that grows with every write.
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

from serving.atomic import write_file

SCHEMA = 1
RECORD_FILE = "adapters.json"
LOCK_FILE = "adapters.lock"
LOG_LIMIT = 200  # entries kept in the file's log; history per name is kept whole


class RecordError(ValueError):
    """The record file exists but cannot be used (unreadable, another schema)."""


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
    }


def _entry(name: str, current: Served | None, history: tuple[Served, ...]) -> Entry:
    # Records written before history kept distinct steps may repeat one: read them as steps.
    return Entry(name, current, steps(history, current))


def from_json(data: Any, *, where: str = RECORD_FILE) -> Record:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise RecordError(f"{where}: schema is {found!r}; this tool reads schema {SCHEMA}")
    try:
        entries = {
            name: _entry(name, _served(e["current"]) if e.get("current") else None,
                         tuple(_served(h) for h in e.get("history", [])))
            for name, e in data.get("adapters", {}).items()
        }
        return Record(int(data.get("serial", 0)), entries, tuple(data.get("log", [])))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"{where}: malformed entry ({type(exc).__name__}: {exc})") from None


class RecordStore:
    """The record file in ``state_dir``; ``locked()`` serialises operations across processes."""

    def __init__(self, state_dir: Path | str):
        self.dir = Path(state_dir)
        self.path = self.dir / RECORD_FILE

    def load(self) -> Record:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Record()
        except OSError as exc:
            raise RecordError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            return from_json(json.loads(text), where=str(self.path))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{self.path}: not valid JSON: {exc}") from None

    def save(self, record: Record) -> Record:
        """Write ``record`` with the next serial, atomically; returns what was written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = replace(record, serial=record.serial + 1)
        text = json.dumps(to_json(saved), indent=2, sort_keys=True) + "\n"
        write_file(self.path, text.encode(), 0o644)
        return saved

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
